"""Block tables, sequence lengths and slot mappings as tensors, in core's layout."""

from __future__ import annotations

import random
import secrets

import pytest
import torch

from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.kv_layout import PAD_BLOCK, PAD_SLOT
from llamatelemetry_kvcache import BlockManager
from llamatelemetry_kvcache.metadata import BlockTableBuilder, block_tables_tensor, slot_mapping, slot_mapping_tensor


def test_tables_lengths_and_slots() -> None:
    manager = BlockManager(10, 4)
    manager.allocate(7, range(9))
    manager.allocate(3, range(2))
    tables, lens = block_tables_tensor(manager, [3, 7])
    assert tables.dtype == lens.dtype == torch.int32
    assert tables.tolist() == [[manager.block_table(3)[0], PAD_BLOCK, PAD_BLOCK], manager.block_table(7)]
    assert lens.tolist() == [2, 9]
    wide, _ = block_tables_tensor(manager, [7], max_blocks_per_seq=5)
    assert wide.shape == (1, 5)
    with pytest.raises(ConfigurationError, match="max_blocks_per_seq=2"):
        block_tables_tensor(manager, [7], max_blocks_per_seq=2)
    table = manager.block_table(7)
    assert slot_mapping(manager, 7, 3, 6) == [table[0] * 4 + 3, table[1] * 4, table[1] * 4 + 1]
    slots = slot_mapping_tensor(manager, [(7, 8, 9), (3, 1, 2)], pad_to=4)
    assert slots.dtype == torch.int64
    assert slots.tolist() == [table[2] * 4, manager.block_table(3)[0] * 4 + 1, PAD_SLOT, PAD_SLOT]
    with pytest.raises(ConfigurationError, match="end=13"):
        slot_mapping(manager, 7, 0, 13)


def test_append_many_is_all_or_nothing() -> None:
    manager = BlockManager(4, 2)
    manager.allocate(1, [1, 2])
    manager.allocate(2, [3])
    manager.append_many([(1, [5]), (2, [6])])
    assert manager.token_ids(1) == [1, 2, 5] and manager.token_ids(2) == [3, 6]
    before = manager.stats()
    with pytest.raises(CapacityError, match="need 2 more blocks but 1"):
        manager.append_many([(1, [0, 0, 0]), (2, [0, 0])])
    assert manager.stats() == before
    with pytest.raises(KeyError):
        manager.append_many([(9, [0])])


@pytest.mark.parametrize("max_rows", [3, 64])
def test_the_incremental_builder_matches_a_full_rebuild(max_rows: int) -> None:
    rng = random.Random(secrets.randbits(31))
    manager = BlockManager(200, 2)
    builder = BlockTableBuilder(manager, max_blocks_per_seq=60, max_rows=max_rows)
    live: list[int] = []
    for step in range(150):
        op = rng.random()
        if op < 0.2 and len(live) < 3:
            seq_id = rng.randrange(6)  # ids are reused after free
            if seq_id not in live and manager.can_allocate([0] * 3):
                manager.allocate(seq_id, [rng.randrange(3) for _ in range(rng.randrange(1, 9))])
                live.append(seq_id)
        elif op < 0.3 and live:
            seq_id = live.pop(rng.randrange(len(live)))
            manager.free(seq_id)
        else:
            for seq_id in live:
                if manager.can_append(seq_id, 1) and manager.num_tokens(seq_id) < 110:
                    manager.append(seq_id, [step % 3])
        order = rng.sample(live, len(live))
        got_tables, got_lens = builder.build(order)
        want_tables, want_lens = block_tables_tensor(manager, order)
        assert torch.equal(got_tables, want_tables) and torch.equal(got_lens, want_lens), step
    fixed, _ = builder.build(live, width=60)
    assert fixed.shape == (len(live), 60)
