"""The KVBlockManager contract, checked on every implementation in ``conftest.BLOCK_MANAGERS``, and the
simple manager's own behaviour."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamatelemetry_batch.serving import SimpleBlockManager, TokenBudget
from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.serving import KVBlockManager

Factory = Callable[[int, int], KVBlockManager]

# Prompts are drawn from a few shared prefixes so that prefix-caching managers get hits.
_PREFIXES = [[7] * 40, [7] * 12 + [3] * 28, [1, 2, 3, 4] * 10, list(range(40))]
_operation = st.one_of(
    st.tuples(st.just("allocate"), st.integers(1, 40), st.integers(0, len(_PREFIXES) - 1)),
    st.tuples(st.just("append"), st.integers(0, 7), st.integers(1, 9)),
    st.tuples(st.just("free"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("decode"), st.integers(0, 255), st.integers(0, 9)),  # a: which live sequences, as bits
)


def _check_invariants(manager: KVBlockManager, tokens: dict[int, list[int]]) -> None:
    page = manager.page_size
    assert 0 <= manager.num_free_blocks <= manager.num_blocks
    owner_of: dict[int, tuple[int, int]] = {}
    held: set[int] = set()
    for seq_id, seq_tokens in tokens.items():
        table = manager.block_table(seq_id)
        assert manager.num_tokens(seq_id) == len(seq_tokens)
        assert len(table) == -(-len(seq_tokens) // page), "the table covers exactly the sequence's tokens"
        for index, block in enumerate(table):
            assert 0 <= block < manager.num_blocks
            held.add(block)
            if block in owner_of:
                # Two sequences share a block only as the same full block of identical leading tokens.
                other_seq, other_index = owner_of[block]
                end = (index + 1) * page
                assert other_index == index and end <= len(seq_tokens)
                assert tokens[other_seq][:end] == seq_tokens[:end], f"block {block} shared by different prefixes"
            owner_of[block] = (seq_id, index)
    assert len(held) <= manager.num_blocks - manager.num_free_blocks, "a held block is counted as free"


@settings(max_examples=60, deadline=None)
@given(
    num_blocks=st.integers(1, 24),
    page_size=st.sampled_from([1, 2, 4, 16]),
    operations=st.lists(_operation, max_size=40),
)
def test_block_manager_contract(
    block_manager_factory: Factory, num_blocks: int, page_size: int, operations: list[tuple[str, int, int]]
) -> None:
    manager = block_manager_factory(num_blocks, page_size)
    assert isinstance(manager, KVBlockManager)
    assert manager.page_size == page_size and manager.num_blocks == num_blocks
    assert manager.num_free_blocks == num_blocks
    tokens: dict[int, list[int]] = {}
    next_id = 0
    for kind, a, b in operations:
        live = sorted(tokens)
        free_before = manager.num_free_blocks
        if kind == "allocate":
            prompt = _PREFIXES[b][:a]
            if manager.can_allocate(prompt):
                cached = manager.allocate(next_id, prompt)
                assert 0 <= cached < len(prompt) and cached % page_size == 0
                tokens[next_id] = list(prompt)
            else:
                with pytest.raises(CapacityError):
                    manager.allocate(next_id, prompt)
                assert manager.num_free_blocks == free_before
                with pytest.raises(KeyError):
                    manager.block_table(next_id)
            next_id += 1
        elif kind == "append" and live:
            seq_id = live[a % len(live)]
            new = [9] * b
            if manager.can_append(seq_id, b):
                manager.append(seq_id, new)
                tokens[seq_id].extend(new)
            else:
                with pytest.raises(CapacityError):
                    manager.append(seq_id, new)
                assert manager.num_free_blocks == free_before
        elif kind == "decode" and live:
            ids = [seq_id for j, seq_id in enumerate(live) if a >> (j % 8) & 1]
            before = {seq_id: manager.num_tokens(seq_id) for seq_id in live}
            try:
                manager.append_decode(ids, [b] * len(ids))
            except CapacityError:
                assert manager.num_free_blocks == free_before, "a failed decode step changed the free count"
                assert {seq_id: manager.num_tokens(seq_id) for seq_id in live} == before
            else:
                for seq_id in ids:
                    tokens[seq_id].append(b)
        elif kind == "free" and live:
            seq_id = live[a % len(live)]
            manager.free(seq_id)
            del tokens[seq_id]
            with pytest.raises(KeyError):
                manager.free(seq_id)
        _check_invariants(manager, tokens)
    for seq_id in list(tokens):
        manager.free(seq_id)
    assert manager.num_free_blocks == num_blocks, "every block is free (or evictable) once every sequence is freed"


def test_append_decode_is_append_for_each_and_all_or_nothing(block_manager_factory: Factory) -> None:
    batched, single = block_manager_factory(12, 4), block_manager_factory(12, 4)
    for manager in (batched, single):
        for seq_id, length in enumerate((3, 4, 8, 1)):  # ends mid-block, on block ends, one token
            manager.allocate(seq_id, list(range(length)))
    for step in range(6):
        batched.append_decode([0, 1, 2, 3], [step, step + 1, step + 2, step + 3])
        for seq_id in range(4):
            single.append(seq_id, [step + seq_id])
        for seq_id in range(4):
            assert batched.num_tokens(seq_id) == single.num_tokens(seq_id)
            assert batched.block_table(seq_id) == single.block_table(seq_id)
        assert batched.num_free_blocks == single.num_free_blocks
    held = {seq_id: batched.num_tokens(seq_id) for seq_id in range(4)}
    free = batched.num_free_blocks
    bad: list[tuple[list[int], list[int], type[Exception], str]] = [
        ([0, 1], [5], ConfigurationError, "one token per sequence"),
        ([0, 0], [5, 6], ConfigurationError, "repeated sequence id"),
        ([0, 99], [5, 6], KeyError, "99"),
    ]
    for ids, tokens, error, match in bad:
        with pytest.raises(error, match=match):
            batched.append_decode(ids, tokens)
        assert {seq_id: batched.num_tokens(seq_id) for seq_id in range(4)} == held and batched.num_free_blocks == free
    full = block_manager_factory(4, 2)  # three sequences on full blocks, one free block: the step needs three
    for seq_id in range(3):
        full.allocate(seq_id, [seq_id * 2 + 1, seq_id * 2 + 2])
    with pytest.raises(CapacityError):
        full.append_decode([0, 1, 2], [7, 8, 9])
    assert [full.num_tokens(seq_id) for seq_id in range(3)] == [2, 2, 2] and full.num_free_blocks == 1
    full.append_decode([2], [9])
    assert full.num_tokens(2) == 3 and full.num_free_blocks == 0


def test_unknown_sequences_raise_key_error(block_manager_factory: Factory) -> None:
    manager = block_manager_factory(4, 2)
    for call in (manager.block_table, manager.num_tokens, manager.free):
        with pytest.raises(KeyError):
            call(123)
    with pytest.raises(KeyError):
        manager.can_append(123, 1)


def test_simple_manager_counts_blocks_and_reuses_freed_ones() -> None:
    manager = SimpleBlockManager(num_blocks=5, page_size=4)
    assert manager.allocate(0, list(range(9))) == 0  # 3 blocks
    assert manager.block_table(0) == [0, 1, 2] and manager.num_free_blocks == 2
    assert not manager.can_allocate(list(range(9)))
    assert manager.can_append(0, 3) and not manager.can_append(0, 12)
    manager.append(0, [1, 2, 3])  # 12 tokens: still 3 blocks
    assert manager.num_free_blocks == 2
    manager.append(0, [4])
    assert manager.block_table(0) == [0, 1, 2, 3] and manager.num_tokens(0) == 13
    with pytest.raises(CapacityError, match="raise num_blocks"):
        manager.allocate(1, list(range(9)))
    manager.free(0)
    assert manager.num_free_blocks == 5
    manager.allocate(1, [5])
    assert manager.block_table(1) == [3], "the most recently freed block is handed out first"


@settings(max_examples=60, deadline=None)
@given(max_tokens=st.integers(1, 50), operations=st.lists(_operation, max_size=40))
def test_token_budget_counts_tokens_and_never_exceeds_the_budget(
    max_tokens: int, operations: list[tuple[str, int, int]]
) -> None:
    budget = TokenBudget(max_tokens)
    assert isinstance(budget, KVBlockManager)
    assert budget.page_size == 1 and budget.num_blocks == max_tokens
    lengths: dict[int, int] = {}
    for step, (kind, a, b) in enumerate(operations):
        live = sorted(lengths)
        left = budget.num_free_blocks
        if kind == "allocate":
            if budget.can_allocate([1] * a):
                assert budget.allocate(step, [1] * a) == 0
                lengths[step] = a
            else:
                with pytest.raises(CapacityError, match="raise max_tokens"):
                    budget.allocate(step, [1] * a)
        elif kind == "append" and live:
            seq_id = live[a % len(live)]
            if budget.can_append(seq_id, b):
                budget.append(seq_id, [2] * b)
                lengths[seq_id] += b
            else:
                with pytest.raises(CapacityError):
                    budget.append(seq_id, [2] * b)
                assert budget.num_free_blocks == left
        elif kind == "free" and live:
            budget.free(live[a % len(live)])
            del lengths[live[a % len(live)]]
        assert budget.num_free_blocks == max_tokens - sum(lengths.values()) >= 0
        assert all(budget.num_tokens(s) == n and budget.block_table(s) == [] for s, n in lengths.items())
    for seq_id in list(lengths):
        budget.free(seq_id)
    assert budget.num_free_blocks == max_tokens
    for call in (budget.block_table, budget.num_tokens, budget.free):
        with pytest.raises(KeyError):
            call(10_000)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_blocks": 0}, "num_blocks"),
        ({"num_blocks": 2, "page_size": 0}, "page_size"),
        ({"num_blocks": True}, "num_blocks"),
    ],
)
def test_simple_manager_rejects_bad_sizes(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SimpleBlockManager(**kwargs)
    with pytest.raises(ConfigurationError, match="max_tokens"):
        TokenBudget(0)


def test_simple_manager_rejects_double_allocation_and_empty_prompts() -> None:
    manager = SimpleBlockManager(4)
    manager.allocate(0, [1])
    with pytest.raises(ConfigurationError, match="already holds blocks"):
        manager.allocate(0, [1])
    with pytest.raises(ConfigurationError, match="at least one token"):
        manager.allocate(1, [])
