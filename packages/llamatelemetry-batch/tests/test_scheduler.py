"""The scheduler's decisions, step by step: chunked prefill, the token budget, preemption, prefix reuse."""

from __future__ import annotations

from typing import Any

import pytest

from llamatelemetry_batch.serving import (
    FinishReason,
    SamplingParams,
    ScheduledStep,
    Scheduler,
    SchedulerConfig,
    Sequence,
    SequenceStatus,
    SimpleBlockManager,
    TokenBudget,
)
from llamatelemetry_batch.serving.testing import PrefixCachingBlockManager
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.serving import KVBlockManager


def _seq(seq_id: int, prompt: list[int], max_new_tokens: int = 8) -> Sequence:
    return Sequence(seq_id, list(prompt), SamplingParams(max_new_tokens=max_new_tokens), max_model_len=1024)


def _run(scheduler: Scheduler, next_token: int = 1) -> ScheduledStep:
    """Plan a step, pretend the model ran it, and append ``next_token`` to every sequence that got logits."""
    plan = scheduler.schedule()
    scheduler.complete_step(plan)
    for seq in plan.logits_sequences:
        seq.token_ids.append(next_token)
    return plan


def _shape(plan: ScheduledStep) -> list[tuple[int, int, int, bool]]:
    return [(s.seq_id, s.start_pos, len(s.token_ids), s.want_logits) for s in plan.step_input.sequences]


def test_a_long_prompt_is_computed_in_chunks_and_only_the_last_asks_for_logits() -> None:
    scheduler = Scheduler(SimpleBlockManager(64, 4), SchedulerConfig(max_num_batched_tokens=4), paged=True)
    scheduler.add(_seq(0, list(range(10))))
    assert _shape(_run(scheduler)) == [(0, 0, 4, False)]
    assert _shape(_run(scheduler)) == [(0, 4, 4, False)]
    plan = _run(scheduler)
    assert _shape(plan) == [(0, 8, 2, True)]
    assert plan.step_input.sequences[0].token_ids == (8, 9)
    assert _shape(_run(scheduler)) == [(0, 10, 1, True)], "then it decodes the sampled token"


def test_decode_and_prefill_chunks_share_a_step_within_the_budget() -> None:
    config = SchedulerConfig(max_num_batched_tokens=6, max_prefill_chunk=4)
    scheduler = Scheduler(SimpleBlockManager(64, 4), config, paged=True)
    scheduler.add(_seq(0, [5, 6]))
    _run(scheduler)  # sequence 0's prompt
    scheduler.add(_seq(1, list(range(20))))
    scheduler.add(_seq(2, list(range(3))))
    plan = _run(scheduler)
    # Sequence 0 decodes 1 token, sequence 1 takes a 4-token chunk, sequence 2 the last budget token.
    assert _shape(plan) == [(0, 2, 1, True), (1, 0, 4, False), (2, 0, 1, False)]
    assert plan.step_input.num_tokens == 6


def test_admission_stops_at_max_num_seqs_and_keeps_arrival_order() -> None:
    scheduler = Scheduler(TokenBudget(64), SchedulerConfig(max_num_seqs=2), paged=False)
    for seq_id in range(4):
        scheduler.add(_seq(seq_id, [1, 2]))
    plan = _run(scheduler)
    assert [s.seq_id for s in plan.step_input.sequences] == [0, 1]
    assert [s.seq_id for s in scheduler.waiting] == [2, 3]
    assert all(s.block_table == () for s in plan.step_input.sequences), "an unpaged model gets no block tables"
    scheduler.finish(plan.sequences[0], FinishReason.STOP)
    assert [s.seq_id for s in _run(scheduler).sequences] == [1, 2]


def test_admission_batch_admits_several_sequences_in_one_step() -> None:
    config = SchedulerConfig(max_num_seqs=4, admission_batch=2)
    scheduler = Scheduler(TokenBudget(256), config, paged=False)
    for seq_id in range(7):
        scheduler.add(_seq(seq_id, [1, 2]))
    assert [s.seq_id for s in _run(scheduler).sequences] == [0, 1, 2, 3], "nothing runs: admit at once"
    scheduler.finish(scheduler.running[0], FinishReason.STOP)
    assert [s.seq_id for s in _run(scheduler).sequences] == [1, 2, 3], "one free slot: keep decoding, admit none"
    scheduler.finish(scheduler.running[1], FinishReason.STOP)
    plan = _run(scheduler)
    assert [s.seq_id for s in plan.sequences] == [1, 3, 4, 5], "two free slots: both admitted in one step"
    assert _shape(plan)[2:] == [(4, 0, 2, True), (5, 0, 2, True)]
    scheduler.finish(scheduler.running[0], FinishReason.STOP)
    assert [s.seq_id for s in _run(scheduler).sequences] == [3, 4, 5, 6], "one waits, one slot free: admitted"


def test_the_newest_sequence_is_preempted_when_blocks_run_out_and_recomputed_with_its_output() -> None:
    released: list[int] = []
    manager = TokenBudget(6)
    config = SchedulerConfig(watermark=0.0)
    scheduler = Scheduler(manager, config, paged=False, release=released.append)
    old, new = _seq(0, [1, 2]), _seq(1, [3, 4])
    scheduler.add(old)
    scheduler.add(new)
    _run(scheduler, next_token=7)  # both prompts: 4 tokens held, 2 tokens sampled
    _run(scheduler, next_token=8)  # both decode: 6 tokens held, the pool is full
    plan = _run(scheduler, next_token=9)
    assert [s.seq_id for s in plan.preempted] == [1] and released == [1]
    assert _shape(plan) == [(0, 3, 1, True)]
    assert new.status is SequenceStatus.WAITING and list(scheduler.waiting) == [new]
    assert new.num_computed_tokens == 0 and new.metrics.num_preemptions == 1
    assert manager.num_free_blocks == 2, "the preempted sequence's blocks are free at once"
    scheduler.finish(old, FinishReason.LENGTH)
    plan = _run(scheduler)
    # Resumed: its prompt and both generated tokens are recomputed in one go; the logits give its third token.
    assert _shape(plan) == [(1, 0, 4, True)]
    assert plan.step_input.sequences[0].token_ids == (3, 4, 7, 8)


def test_a_sequence_that_cannot_grow_alone_preempts_itself_and_returns_later() -> None:
    manager = SimpleBlockManager(num_blocks=3, page_size=1)
    scheduler = Scheduler(manager, SchedulerConfig(watermark=0.0), paged=False)
    seq = _seq(0, [1, 2, 3])
    scheduler.add(seq)
    _run(scheduler)
    plan = _run(scheduler)
    assert plan.empty and plan.preempted == [seq] and manager.num_free_blocks == 3


def test_a_cached_prefix_is_not_computed_again() -> None:
    manager = PrefixCachingBlockManager(num_blocks=16, page_size=4)
    scheduler = Scheduler(manager, SchedulerConfig(), paged=True)
    first = _seq(0, list(range(10)))
    scheduler.add(first)
    _run(scheduler)
    scheduler.finish(first, FinishReason.STOP)
    second = _seq(1, [*range(8), 42, 43, 44])
    scheduler.add(second)
    plan = _run(scheduler)
    assert _shape(plan) == [(1, 8, 3, True)]
    assert second.metrics.num_cached_prompt_tokens == 8
    assert plan.step_input.sequences[0].block_table[:2] == tuple(manager.block_table(1)[:2])


def test_an_unpaged_model_computes_cached_tokens_anyway() -> None:
    manager = PrefixCachingBlockManager(num_blocks=16, page_size=4)
    scheduler = Scheduler(manager, SchedulerConfig(), paged=False)
    first = _seq(0, list(range(10)))
    scheduler.add(first)
    _run(scheduler)
    scheduler.finish(first, FinishReason.STOP)
    scheduler.add(_seq(1, list(range(10))))
    assert _shape(_run(scheduler)) == [(1, 0, 10, True)]


def _prefix_race(manager: KVBlockManager) -> tuple[Scheduler, Sequence, Sequence]:
    """Sequence 0 computes a 16-token prompt 4 tokens a step; sequence 1, same prompt, arrives meanwhile."""
    config = SchedulerConfig(max_num_batched_tokens=8, max_prefill_chunk=4)
    scheduler = Scheduler(manager, config, paged=True)
    writer, reader = _seq(0, list(range(16))), _seq(1, list(range(16)))
    scheduler.add(writer)
    scheduler.add(reader)
    return scheduler, writer, reader


def test_a_sequence_waits_for_cached_blocks_another_one_is_still_writing() -> None:
    scheduler, _, reader = _prefix_race(PrefixCachingBlockManager(num_blocks=16, page_size=4))
    shapes = [_shape(_run(scheduler)) for _ in range(4)]
    # The reader's 12 cached tokens are only read once the writer has computed them.
    assert shapes[:3] == [[(0, 0, 4, False)], [(0, 4, 4, False)], [(0, 8, 4, False)]]
    assert shapes[3] == [(0, 12, 4, True), (1, 12, 4, True)]
    assert reader.metrics.num_cached_prompt_tokens == 12


def test_a_sequence_computes_cached_blocks_whose_writer_went_away() -> None:
    scheduler, writer, _ = _prefix_race(PrefixCachingBlockManager(num_blocks=16, page_size=4))
    _run(scheduler)  # the writer completes block 0 only
    scheduler.finish(writer, FinishReason.CANCELLED)
    assert _shape(_run(scheduler)) == [(1, 4, 4, False)], "block 0 is complete, block 1 was never written"


def test_finish_frees_blocks_at_once_and_leaves_no_trace() -> None:
    manager = PrefixCachingBlockManager(num_blocks=8, page_size=2)
    scheduler = Scheduler(manager, SchedulerConfig(max_num_batched_tokens=2), paged=True)
    seq = _seq(0, [1, 2, 3, 4, 5])
    scheduler.add(seq)
    _run(scheduler)
    scheduler.finish(seq, FinishReason.CANCELLED)
    assert manager.num_free_blocks == 8 and seq.finished and seq.finish_reason is FinishReason.CANCELLED
    assert not scheduler.has_unfinished and scheduler._writer == {}
    waiting = _seq(1, [1])
    scheduler.add(waiting)
    scheduler.finish(waiting, FinishReason.CANCELLED)
    assert not scheduler.waiting


def test_a_block_manager_breaking_the_cached_count_contract_is_reported() -> None:
    class Liar(SimpleBlockManager):
        def allocate(self, seq_id: int, token_ids: object) -> int:
            super().allocate(seq_id, token_ids)  # type: ignore[arg-type]
            return 3

    scheduler = Scheduler(Liar(8, 2), paged=True)
    scheduler.add(_seq(0, [1, 2, 3, 4, 5]))
    with pytest.raises(ConfigurationError, match="multiple of page_size 2"):
        scheduler.schedule()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": -1}, "max_num_batched_tokens"),
        ({"max_prefill_chunk": 0}, "max_prefill_chunk"),
        ({"watermark": 1.0}, "watermark"),
        ({"watermark": "a"}, "watermark"),
        ({"admission_batch": 0}, "admission_batch"),
        ({"admission_batch": 2.0}, "admission_batch"),
        ({"max_num_seqs": 4, "admission_batch": 5}, "admission_batch"),
    ],
)
def test_scheduler_config_names_the_bad_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        SchedulerConfig(**kwargs)  # type: ignore[arg-type]


class _WithoutDecodeStep:
    """A paged manager written before the protocol had ``append_decode``: every other call delegates."""

    def __init__(self, inner: SimpleBlockManager) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        if name == "append_decode":
            raise AttributeError(name)
        return getattr(self._inner, name)


def test_decoding_batches_appends_and_a_manager_without_append_decode_still_works() -> None:
    tables = []
    managers: list[Any] = [SimpleBlockManager(64, 4), _WithoutDecodeStep(SimpleBlockManager(64, 4))]
    for manager in managers:
        scheduler = Scheduler(manager, SchedulerConfig(), paged=True)
        for seq_id, length in enumerate((3, 4, 6)):
            scheduler.add(_seq(seq_id, list(range(length)), max_new_tokens=9))
        for _ in range(9):
            _run(scheduler)
        tables.append([(manager.num_tokens(i), manager.block_table(i)) for i in range(3)])
    assert tables[0] == tables[1]
    assert [n for n, _ in tables[0]] == [11, 12, 14]  # prompt + 8 decoded tokens held (the 9th is not computed)
