"""BlockManager: the protocol, prefix caching, LRU eviction, copy-on-write fork, statistics, errors."""

from __future__ import annotations

import pytest

from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.serving import KVBlockManager
from llamatelemetry_kvcache import BlockManager


def test_it_is_core_s_block_manager() -> None:
    manager = BlockManager(8, 4)
    assert isinstance(manager, KVBlockManager)
    assert (manager.num_blocks, manager.page_size, manager.num_free_blocks) == (8, 4, 8)


def test_allocate_append_free_take_and_return_blocks() -> None:
    manager = BlockManager(6, 4)
    assert manager.allocate(1, range(6)) == 0
    assert manager.block_table(1) == [0, 1] and manager.num_tokens(1) == 6
    manager.append(1, [6, 7])  # fills block 1
    assert manager.block_table(1) == [0, 1]
    manager.append(1, [8])
    assert manager.block_table(1) == [0, 1, 2] and manager.num_tokens(1) == 9
    stats = manager.stats()
    assert (stats.used, stats.free, stats.cached, stats.waste_slots) == (3, 3, 0, 3)
    manager.free(1)
    assert 1 not in manager
    stats = manager.stats()
    assert stats.used == 0 and stats.free + stats.cached == 6
    with pytest.raises(KeyError, match="unknown sequence 1"):
        manager.block_table(1)


def test_a_shared_prefix_is_reused_once_computed() -> None:
    manager = BlockManager(10, 4)
    prompt = list(range(10))
    assert manager.allocate(1, prompt) == 0
    # Not computed yet (a prefill in progress): a second prompt must not read those blocks.
    assert manager.allocate(2, prompt) == 0
    manager.free(2)
    manager.append(1, [99])  # the model ran the whole prompt: its full blocks become reusable
    assert manager.allocate(3, [*prompt[:8], 50, 51, 52]) == 8
    assert manager.block_table(3)[:2] == manager.block_table(1)[:2]
    assert manager.ref_count(manager.block_table(1)[0]) == 2
    # The whole prompt cached: the last block is still computed (the model must yield the next logits).
    assert manager.allocate(4, prompt[:8]) == 4
    stats = manager.stats()
    assert stats.prefix_hit_tokens == 12 and stats.prompt_tokens == 10 + 10 + 11 + 8
    assert stats.prefix_hit_rate == pytest.approx(12 / 39)


def test_cached_blocks_survive_free_and_are_evicted_lru_only_when_the_free_list_is_empty() -> None:
    manager = BlockManager(4, 2)
    manager.allocate(1, [1, 2, 3, 4, 5])
    manager.mark_computed(1, 5)
    manager.free(1)
    stats = manager.stats()
    assert (stats.cached, stats.free) == (2, 2)
    assert manager.num_free_blocks == 4
    manager.allocate(2, [7, 8, 9])  # takes the 2 free blocks, evicts nothing
    assert manager.stats().cached == 2
    assert not manager.can_allocate([1, 2, 3, 4, 0])  # both cached blocks hit, one new block needed: none left
    assert manager.can_allocate([1, 2, 3, 0])  # one hit, and the other cached block can be evicted
    assert manager.allocate(3, [1, 2, 9]) == 2  # hits [1, 2]; evicts the LRU cached block for its tail
    stats = manager.stats()
    assert (stats.used, stats.cached, stats.free) == (4, 0, 0)
    manager.free(2)
    manager.free(3)
    assert manager.allocate(4, [1, 2, 3, 4, 5]) == 2  # [3, 4] was evicted: only [1, 2] hits


def test_capacity_errors_change_nothing() -> None:
    manager = BlockManager(3, 2)
    manager.allocate(1, [1, 2, 3])
    before = manager.stats()
    assert not manager.can_allocate(range(5))
    with pytest.raises(CapacityError, match=r"needs 3 new blocks of 2 tokens for 5 tokens .* 1 can be handed out"):
        manager.allocate(2, range(5))
    assert manager.can_append(1, 3) and not manager.can_append(1, 4)
    with pytest.raises(CapacityError, match="preempt"):
        manager.append(1, [0, 0, 0, 0])
    assert manager.stats() == before and manager.num_tokens(1) == 3 and 2 not in manager


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    manager = BlockManager(8, 4)
    manager.allocate(1, range(6))
    copies = manager.fork(1, 2)
    parent, child = manager.block_table(1), manager.block_table(2)
    assert child[0] == parent[0] and child[1] != parent[1]
    assert copies == [(parent[1], child[1])]
    assert manager.ref_count(parent[0]) == 2 and manager.ref_count(parent[1]) == 1
    manager.append(2, [7, 7])
    assert manager.token_ids(1) == list(range(6)) and manager.token_ids(2) == [*range(6), 7, 7]
    manager.append(1, [0, 0])  # fills its block exactly
    assert manager.fork(1, 3) == []  # nothing partial to copy
    assert manager.block_table(3) == manager.block_table(1)


def test_bad_calls() -> None:
    manager = BlockManager(4, 2)
    manager.allocate(1, [1])
    with pytest.raises(ConfigurationError, match="already holds blocks"):
        manager.allocate(1, [1])
    with pytest.raises(ConfigurationError, match="at least one token"):
        manager.allocate(2, [])
    with pytest.raises(ConfigurationError, match="already holds blocks"):
        manager.fork(1, 1)
    with pytest.raises(ConfigurationError, match=r"num_tokens in \[0, 1\]"):
        manager.mark_computed(1, 2)
    with pytest.raises(ConfigurationError, match="page_size"):
        BlockManager(4, 0)
    assert not manager.can_allocate([])


def test_prefix_caching_can_be_switched_off() -> None:
    manager = BlockManager(6, 2, enable_prefix_caching=False)
    manager.allocate(1, [1, 2, 3])
    manager.append(1, [4])
    manager.free(1)
    assert manager.stats().cached == 0 and manager.allocate(2, [1, 2, 3]) == 0


def test_a_stand_in_token_replaced_before_its_block_fills_is_what_the_prefix_cache_hashes() -> None:
    bm = BlockManager(num_blocks=8, page_size=4)
    bm.allocate(0, [1, 2, 3])
    bm.append(0, [0])  # a stand-in for a token still on the device
    bm.replace_last_tokens([0], [4])
    bm.append_decode([0], [0])  # the next stand-in, in the next block: the full block [1, 2, 3, 4] is hashed now
    bm.replace_last_tokens([0], [5])
    assert bm.allocate(1, [1, 2, 3, 4, 9]) == 4, "the block registered under its real tokens is reused"
    bm.allocate(2, [1, 2, 3, 0, 9])
    assert bm.block_table(2)[0] != bm.block_table(0)[0], "no block was registered under the stand-in"


def test_a_token_whose_block_is_registered_cannot_be_replaced() -> None:
    bm = BlockManager(num_blocks=8, page_size=2)
    bm.allocate(0, [1, 2])
    bm.append(0, [3])  # block 0 ([1, 2]) is registered once the sequence grows past it
    bm.replace_last_tokens([0], [4])  # the last token is in the unregistered second block: fine
    bm.allocate(1, [7, 8])
    bm.mark_computed(1, 2)  # the whole block computed and registered, the last token with it
    with pytest.raises(ConfigurationError, match="already registered"):
        bm.replace_last_tokens([1], [9])
    with pytest.raises(KeyError, match="unknown sequence"):
        bm.replace_last_tokens([5], [1])
