"""Fuzzing the paged cache's bookkeeping with hostile arguments (see ``llamatelemetry_core.testing.fuzz``).

* :class:`BlockManager` (its allocation properties live in ``test_block_manager_properties.py``): hostile ids,
  tokens and counts get a typed error (or the protocol's ``KeyError`` for an unknown sequence) and change
  nothing; whatever it accepted is what the protocol allows.
* The step metadata (``slot_mapping_tensor``, ``block_tables_tensor``) from hostile spans, padding and widths:
  the slots of each span in order, or a typed error naming the argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamatelemetry_core.kv_layout import PAD_SLOT
from llamatelemetry_core.testing.fuzz import check_call, fuzz_settings
from llamatelemetry_kvcache import BlockManager, block_tables_tensor, slot_mapping_tensor

METHODS = ["allocate", "can_allocate", "append", "append_many", "append_decode", "can_append", "fork", "free"]
METHODS += ["mark_computed", "ref_count", "block_table", "num_tokens"]
HOSTILE_IDS = st.one_of(
    st.sampled_from([0, 1, 2]), st.integers(-3, -1), st.just(2**63), st.sampled_from(["0", None, 1.0, True])
)
HOSTILE_TOKENS = st.one_of(
    st.lists(st.integers(0, 5), max_size=6),
    st.lists(st.one_of(st.integers(-2, 5), st.sampled_from([1.5, "a", None, True, 2**70])), max_size=3),
    st.sampled_from([None, "abc", 3]),
)
HOSTILE_COUNTS = st.one_of(st.integers(-2, 20), st.sampled_from([1.5, "1", None, True, 2**63]))


def _snapshot(manager: BlockManager) -> tuple[object, ...]:
    seqs = tuple((s, manager.block_table(s), manager.token_ids(s)) for s in manager.seq_ids)
    return manager.stats(), seqs, [manager.ref_count(b) for b in range(manager.num_blocks)]


@fuzz_settings(ci=80)
@given(
    method=st.sampled_from(METHODS),
    seq_id=HOSTILE_IDS,
    other_id=HOSTILE_IDS,
    tokens=HOSTILE_TOKENS,
    count=HOSTILE_COUNTS,
    ids=st.lists(HOSTILE_IDS, max_size=3),
    prefix=st.booleans(),
)
def test_block_manager_hostile_arguments_change_nothing(
    method: str, seq_id: Any, other_id: Any, tokens: Any, count: Any, ids: list[Any], prefix: bool
) -> None:
    manager = BlockManager(6, 2, enable_prefix_caching=prefix)
    manager.allocate(0, [1, 2, 3])
    manager.allocate(1, [1, 2])
    manager.append(1, [4])
    calls: dict[str, Callable[[], object]] = {
        "allocate": lambda: manager.allocate(seq_id, tokens),
        "can_allocate": lambda: manager.can_allocate(tokens),
        "append": lambda: manager.append(seq_id, tokens),
        "append_many": lambda: manager.append_many([(0, [7]), (seq_id, tokens)]),
        "append_decode": lambda: manager.append_decode(ids, tokens),
        "can_append": lambda: manager.can_append(seq_id, count),
        "fork": lambda: manager.fork(seq_id, other_id),
        "free": lambda: manager.free(seq_id),
        "mark_computed": lambda: manager.mark_computed(seq_id, count),
        "ref_count": lambda: manager.ref_count(count),
        "block_table": lambda: manager.block_table(seq_id),
        "num_tokens": lambda: manager.num_tokens(seq_id),
    }
    before = _snapshot(manager)
    outcome = check_call(
        calls[method],
        None,
        arguments=["seq_id", "child_id", "token_ids", "num_tokens", "block", "sequence"],
        documented=(KeyError,),
        name=method,
    )
    if outcome.raised:
        assert _snapshot(manager) == before, f"{method} raised {outcome.error!r} but changed the manager"
        return
    # What was accepted is what the protocol allows: ints for ids, ints >= 0 for tokens and counts.
    token_list = isinstance(tokens, list) and all(type(t) is int and t >= 0 for t in tokens)
    if method in ("allocate", "append", "append_many", "can_allocate", "append_decode"):
        assert token_list, f"{method} accepted token_ids={tokens!r}"
    if method == "allocate":
        assert type(seq_id) is int
    if method in ("append", "append_many", "fork", "free", "mark_computed", "block_table", "num_tokens"):
        assert seq_id in (0, 1)  # a known sequence (1.0 and True are equal to 1, as dictionary keys)
    if method == "fork":
        assert type(other_id) is int
    if method in ("can_append", "mark_computed", "ref_count"):
        assert type(count) is int and count >= 0
    if method == "append_decode":
        assert all(i in (0, 1) for i in ids) and len(set(ids)) == len(ids) == len(tokens)  # known sequences
    for s in manager.seq_ids:  # whatever happened, every sequence still reads back as ints
        assert all(type(t) is int for t in manager.token_ids(s))


@pytest.mark.parametrize("call", ["decode_fast_path", "append_fast_path"])
def test_non_int_tokens_never_enter_the_decode_fast_path(call: str) -> None:
    manager = BlockManager(4, 4)
    manager.allocate(0, [1, 2])  # room left in the block: the fast path would take the token as it is
    refused: Callable[[], None] = {
        "decode_fast_path": lambda: manager.append_decode([0], [2.5]),  # type: ignore[list-item]
        "append_fast_path": lambda: manager.append(0, [2.5]),  # type: ignore[list-item]
    }[call]
    with pytest.raises(ValueError, match="token_ids"):
        refused()
    assert manager.token_ids(0) == [1, 2]


SPAN_VALUES = st.one_of(st.integers(-2, 9), st.sampled_from([0.5, "1", None]))


@fuzz_settings(ci=40)
@given(
    spans=st.one_of(
        st.lists(st.tuples(st.sampled_from([0, 1, 7]), SPAN_VALUES, SPAN_VALUES), max_size=3),
        st.sampled_from([None, "abc", [(0, 1)], [[0, 0, 2]]]),
    ),
    pad_to=st.one_of(st.none(), st.integers(-1, 12), st.sampled_from([2.5, "4"])),
    width=st.one_of(st.none(), st.integers(-1, 5), st.sampled_from([1.5, "2"])),
)
def test_step_metadata_from_hostile_spans(spans: Any, pad_to: Any, width: Any) -> None:
    manager = BlockManager(8, 2)
    manager.allocate(0, [1, 2, 3])
    manager.allocate(1, [4, 5, 6, 7, 8])
    outcome = check_call(
        lambda: slot_mapping_tensor(manager, spans, pad_to=pad_to),
        None,
        arguments=["spans", "start", "end", "pad_to", "sequence"],
        documented=(KeyError,),
        name="slot_mapping_tensor",
    )
    if not outcome.raised:  # the slots of each span, in order, then padding
        want: list[int] = []
        for seq_id, start, end in spans:
            table = manager.block_table(seq_id)
            assert type(start) is int and type(end) is int and 0 <= start <= end <= len(table) * 2
            want += [table[t // 2] * 2 + t % 2 for t in range(start, end)]
        want += [PAD_SLOT] * ((pad_to or 0) - len(want))
        assert outcome.result.tolist() == want
    outcome = check_call(
        lambda: block_tables_tensor(manager, [0, 1], max_blocks_per_seq=width),
        None,
        arguments=["max_blocks_per_seq"],
        name="block_tables_tensor",
    )
    assert outcome.raised != (width is None or (type(width) is int and width >= 3))
