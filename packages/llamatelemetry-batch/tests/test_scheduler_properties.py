"""Property tests of the scheduler through the engine: random arrivals, prompt lengths, budgets and block pools.

For every block manager in ``conftest.BLOCK_MANAGERS`` and both model flavours (paged, per-sequence state):
no request is lost or duplicated, every block is free at the end, no step exceeds the token budget or the
sequence limit, and each request's output equals running it alone (greedy: the toy model's known continuation;
sampled with a seed: a run of that request alone), preempted requests included.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from llamatelemetry_batch.serving import (
    ContinuousBatchingEngine,
    FinishReason,
    RequestHandle,
    RequestOutput,
    SamplingParams,
    SchedulerConfig,
    TokenBudget,
)
from llamatelemetry_batch.serving.testing import HashDecoder, TinyDecoder
from llamatelemetry_core.serving import KVBlockManager

Factory = Callable[[int, int], KVBlockManager]
_FAMILIES = [[3] * 48, [5, 8] * 24, list(range(48)), [1] * 16 + list(range(32))]


@dataclass(frozen=True)
class Arrival:
    step: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    cancel_after: int | None  # steps after arrival, or never
    seed: int


@st.composite
def _arrivals(draw: st.DrawFn, max_requests: int = 10) -> list[Arrival]:
    out = []
    for _ in range(draw(st.integers(1, max_requests))):
        family = draw(st.sampled_from(_FAMILIES))
        shared = draw(st.integers(0, 40))
        tail = draw(st.lists(st.integers(0, 60), max_size=8))
        prompt = tuple(family[:shared] + tail) or (7,)
        cancel = draw(st.one_of(st.none(), st.integers(0, 12))) if draw(st.integers(0, 5)) == 0 else None
        out.append(Arrival(draw(st.integers(0, 12)), prompt, draw(st.integers(1, 10)), cancel, draw(st.integers(0, 9))))
    return out


def _drive(
    engine: ContinuousBatchingEngine, arrivals: list[Arrival], params: Callable[[Arrival], SamplingParams]
) -> tuple[list[RequestHandle], list[RequestOutput]]:
    """Submit each arrival at its step, cancel at its step, run until everything finished."""
    handles: list[RequestHandle | None] = [None] * len(arrivals)
    finished: list[RequestOutput] = []
    step = 0
    while step <= 12 or engine.has_unfinished:
        for index, arrival in enumerate(arrivals):
            if arrival.step == step:
                handles[index] = engine.submit(list(arrival.prompt), params(arrival))
            handle = handles[index]
            if handle is not None and arrival.cancel_after is not None and step == arrival.step + arrival.cancel_after:
                handle.cancel()
        finished.extend(engine.step())
        step += 1
        assert step < 3000, "the engine stopped making progress"
    assert all(h is not None for h in handles)
    return [h for h in handles if h is not None], finished


def _check_common(
    engine: ContinuousBatchingEngine,
    manager: KVBlockManager,
    handles: list[RequestHandle],
    finished: list[RequestOutput],
) -> None:
    assert sorted(o.request_id for o in finished) == sorted(h.request_id for h in handles), "lost or duplicated"
    assert all(h.done() for h in handles)
    assert manager.num_free_blocks == manager.num_blocks, "every block is free at the end"
    scheduler = engine.scheduler
    assert not scheduler.waiting and not scheduler.has_unfinished and not scheduler._writer
    if sum(o.metrics.num_preemptions for o in finished):
        event("preempted")
    if sum(o.metrics.num_cached_prompt_tokens for o in finished):
        event("prefix reused")


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "unpaged"])
@settings(max_examples=60, deadline=None)
@given(
    arrivals=_arrivals(),
    page_size=st.sampled_from([1, 2, 4, 8]),
    spare_blocks=st.one_of(st.integers(0, 2), st.integers(0, 40)),
    budget=st.integers(1, 48),
    max_num_seqs=st.integers(1, 6),
    chunk=st.one_of(st.none(), st.integers(1, 12)),
    watermark=st.sampled_from([0.0, 0.05]),
    token_budget=st.booleans(),
    admission=st.integers(1, 6),
)
def test_greedy_requests_finish_as_if_alone(
    block_manager_factory: Factory,
    paged: bool,
    arrivals: list[Arrival],
    page_size: int,
    spare_blocks: int,
    budget: int,
    max_num_seqs: int,
    chunk: int | None,
    watermark: float,
    token_budget: bool,
    admission: int,
) -> None:
    longest = max(len(a.prompt) + a.max_new_tokens for a in arrivals)
    num_blocks = -(-longest // page_size) + spare_blocks
    manager = block_manager_factory(num_blocks, page_size)
    if token_budget and not paged:  # the unpaged model's own budget, in tokens
        manager = TokenBudget(num_blocks * page_size)
    model = HashDecoder(vocab_size=61, max_model_len=64, page_size=page_size if paged else None, num_blocks=num_blocks)
    model.record_steps = True
    admission_batch = min(admission, max_num_seqs)  # changes when requests start, never what they compute
    config = SchedulerConfig(max_num_seqs, budget, chunk, watermark, admission_batch=admission_batch)
    engine = ContinuousBatchingEngine(model, manager, scheduler_config=config, eos_token_ids=[0])
    handles, finished = _drive(engine, arrivals, lambda a: SamplingParams(max_new_tokens=a.max_new_tokens))
    _check_common(engine, manager, handles, finished)
    for step in model.steps:
        assert step.num_tokens <= budget and len(step.sequences) <= max_num_seqs
        assert len({s.seq_id for s in step.sequences}) == len(step.sequences), "a sequence twice in one step"
        assert all(s.token_ids for s in step.sequences)
    assert model.num_live_sequences == 0, "every sequence's model state is released"
    for arrival, handle in zip(arrivals, handles, strict=True):
        output = handle.result()
        expected = model.expected_greedy(arrival.prompt, arrival.max_new_tokens, stop_token_ids=[0])
        if output.finish_reason is FinishReason.CANCELLED:
            assert list(output.output_token_ids) == expected[: len(output.output_token_ids)]
        else:
            assert list(output.output_token_ids) == expected, f"request {handle.request_id} ({output.metrics})"
            last = expected[-1]
            assert output.finish_reason is (FinishReason.STOP if last == 0 else FinishReason.LENGTH)


@pytest.mark.usefixtures("single_thread_torch")
@settings(max_examples=25, deadline=None)
@given(arrivals=_arrivals(max_requests=6), page_size=st.sampled_from([1, 4]), spare_blocks=st.integers(0, 12))
def test_seeded_sampled_requests_do_not_depend_on_the_batch(
    block_manager_factory: Factory, arrivals: list[Arrival], page_size: int, spare_blocks: int
) -> None:
    arrivals = [Arrival(a.step, a.prompt, a.max_new_tokens, None, a.seed) for a in arrivals]

    def params(a: Arrival) -> SamplingParams:
        return SamplingParams(max_new_tokens=a.max_new_tokens, temperature=0.8, top_p=0.9, seed=a.seed)

    def engine_for(num_blocks: int) -> tuple[ContinuousBatchingEngine, KVBlockManager]:
        manager = block_manager_factory(num_blocks, page_size)
        model = HashDecoder(vocab_size=61, max_model_len=64, page_size=page_size, num_blocks=num_blocks, one_hot=False)
        return ContinuousBatchingEngine(model, manager, scheduler_config=SchedulerConfig(4, 16, watermark=0.0)), manager

    longest = max(len(a.prompt) + a.max_new_tokens for a in arrivals)
    num_blocks = -(-longest // page_size) + spare_blocks
    engine, manager = engine_for(num_blocks)
    handles, finished = _drive(engine, arrivals, params)
    _check_common(engine, manager, handles, finished)
    for arrival, handle in zip(arrivals, handles, strict=True):
        alone, _ = engine_for(num_blocks)
        (expected,) = alone.generate([list(arrival.prompt)], params(arrival))
        assert handle.result().output_token_ids == expected.output_token_ids


@pytest.mark.usefixtures("single_thread_torch")
@pytest.mark.parametrize("paged", [True, False], ids=["paged", "unpaged"])
@settings(max_examples=10, deadline=None)
@given(arrivals=_arrivals(max_requests=4), spare_blocks=st.integers(0, 6), budget=st.integers(2, 24))
def test_tiny_transformer_outputs_equal_running_each_request_alone(
    block_manager_factory: Factory, paged: bool, arrivals: list[Arrival], spare_blocks: int, budget: int
) -> None:
    page_size = 4
    arrivals = [Arrival(a.step % 4, a.prompt[:12], min(a.max_new_tokens, 4), None, 0) for a in arrivals]

    def engine_for(num_blocks: int) -> tuple[ContinuousBatchingEngine, KVBlockManager, TinyDecoder]:
        manager = block_manager_factory(num_blocks, page_size)
        model = TinyDecoder(page_size=page_size if paged else None, num_blocks=num_blocks, max_model_len=20, width=16)
        config = SchedulerConfig(4, budget, watermark=0.0)
        return ContinuousBatchingEngine(model, manager, scheduler_config=config), manager, model

    longest = max(len(a.prompt) + a.max_new_tokens for a in arrivals)
    num_blocks = -(-longest // page_size) + spare_blocks
    engine, manager, model = engine_for(num_blocks)
    handles, finished = _drive(engine, arrivals, lambda a: SamplingParams(max_new_tokens=a.max_new_tokens))
    _check_common(engine, manager, handles, finished)
    # Running a request alone: the cache-free reference forward, token by token (the first request also through
    # an engine of its own, so both meanings of "alone" are checked).
    for index, (arrival, handle) in enumerate(zip(arrivals, handles, strict=True)):
        tokens = list(arrival.prompt)
        for _ in range(arrival.max_new_tokens):
            tokens.append(int(model.reference_logits(tokens)[-1].argmax()))
        assert list(handle.result().output_token_ids) == tokens[len(arrival.prompt) :]
        if index == 0:
            alone, _, _ = engine_for(num_blocks)
            (expected,) = alone.generate([list(arrival.prompt)], SamplingParams(max_new_tokens=arrival.max_new_tokens))
            assert expected.output_token_ids == handle.result().output_token_ids


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "unpaged"])
def test_preempted_requests_finish_with_the_output_they_would_have_had(
    block_manager_factory: Factory, paged: bool
) -> None:
    """Eight requests that all fit as prompts but not as finished sequences: preemption is certain."""
    page_size, num_blocks = 4, 12
    manager = block_manager_factory(num_blocks, page_size)
    model = HashDecoder(vocab_size=61, max_model_len=64, page_size=page_size if paged else None, num_blocks=num_blocks)
    engine = ContinuousBatchingEngine(model, manager, scheduler_config=SchedulerConfig(8, 64, watermark=0.0))
    prompts = [[k, k + 1, k + 2, k + 3, k + 4] for k in range(8)]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=20))
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    for prompt, output in zip(prompts, outputs, strict=True):
        assert list(output.output_token_ids) == model.expected_greedy(prompt, 20)
    assert manager.num_free_blocks == num_blocks
