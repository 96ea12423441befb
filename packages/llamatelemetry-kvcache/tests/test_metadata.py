"""Block tables, sequence lengths and slot mappings as tensors, in core's layout."""

from __future__ import annotations

import pytest
import torch

from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.kv_layout import PAD_BLOCK, PAD_SLOT
from llamatelemetry_kvcache import BlockManager
from llamatelemetry_kvcache.metadata import block_tables_tensor, slot_mapping, slot_mapping_tensor


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
