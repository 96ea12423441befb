"""Property tests of the batch planner and the dispatcher: nothing lost or duplicated, limits never exceeded."""

from __future__ import annotations

import random
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from llamatelemetry_batch import BatchConfig, InferenceHTTPError
from llamatelemetry_batch.dispatch import Dispatcher, WorkItem, plan_batches


@given(
    tokens=st.lists(st.integers(1, 300), max_size=60),
    max_batch_size=st.integers(1, 9),
    max_tokens=st.integers(1, 600),
    by_length=st.booleans(),
)
def test_plan_batches_covers_every_prompt_once_within_limits(
    tokens: list[int], max_batch_size: int, max_tokens: int, by_length: bool
) -> None:
    batches = plan_batches(tokens, max_batch_size, max_tokens, by_length=by_length)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(tokens)))
    for batch in batches:
        assert 1 <= len(batch) <= max_batch_size
        if len(batch) > 1:  # only a prompt alone may exceed the budget
            assert len(batch) * max(tokens[i] for i in batch) <= max_tokens
    if by_length:
        lengths = [tokens[i] for i in flat]
        assert lengths == sorted(lengths)  # batches hold neighbours in length
    else:
        assert flat == list(range(len(tokens)))


def test_plan_batches_groups_by_length_to_avoid_padding() -> None:
    tokens = [100, 1, 100, 1, 100, 1]
    assert plan_batches(tokens, 3, 10_000, by_length=True) == [[1, 3, 5], [0, 2, 4]]
    assert plan_batches(tokens, 3, 10_000, by_length=False) == [[0, 1, 2], [3, 4, 5]]
    assert plan_batches([5, 5, 50, 5], 8, 20, by_length=False) == [[0, 1], [2], [3]]  # 50 > 20 runs alone


@settings(max_examples=150, deadline=None)
@given(
    tokens=st.lists(st.integers(1, 50), min_size=1, max_size=40),
    max_in_flight=st.integers(1, 6),
    max_tokens=st.integers(1, 120),
    backfill=st.booleans(),
    max_retries=st.integers(0, 3),
    stop_on_error=st.booleans(),
    batched=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_dispatcher_loses_nothing_and_respects_its_limits(
    tokens: list[int],
    max_in_flight: int,
    max_tokens: int,
    backfill: bool,
    max_retries: int,
    stop_on_error: bool,
    batched: bool,
    seed: int,
) -> None:
    rng = random.Random(seed)
    config = BatchConfig(
        max_tokens=max_tokens,
        dynamic_batching=backfill,
        max_retries=max_retries,
        stop_on_error=stop_on_error,
        retry_backoff=0.01,
        retry_backoff_max=0.05,
    )

    def cost(indices: Sequence[int]) -> int:
        return len(indices) * max(tokens[i] for i in indices)

    if batched:
        batches = plan_batches(tokens, 4, max_tokens, by_length=backfill)
        items = [WorkItem((k,), tuple(b), cost(b)) for k, b in enumerate(batches)]
        dispatcher = Dispatcher(items, len(tokens), config, max_in_flight=1, batch_tokens=cost, rng=rng)
        limit = 1
    else:
        items = [WorkItem((i,), (i,), t) for i, t in enumerate(tokens)]
        dispatcher = Dispatcher(items, len(tokens), config, max_in_flight=max_in_flight, rng=rng)
        limit = max_in_flight
    # Every seventh prompt (3, 10, ...) always fails (not transient); others fail transiently at random.
    bad = {i for i in range(len(tokens)) if i % 7 == 3}
    running: list[WorkItem] = []
    attempts: dict[int, int] = {}
    now = 0.0
    for _ in range(10_000):
        started = dispatcher.start(now)
        running.extend(started)
        assert dispatcher.in_flight == len(running) <= limit
        oversize_alone = len(running) == 1 and running[0].tokens > max_tokens
        assert dispatcher.in_flight_tokens == sum(i.tokens for i in running)
        assert oversize_alone or dispatcher.in_flight_tokens <= max_tokens
        if dispatcher.done:
            break
        if not running:
            wake = dispatcher.next_ready_at(now)
            assert wake is not None and wake > now, "nothing runs and nothing will: the run is stuck"
            now = wake
            continue
        item = running.pop(rng.randrange(len(running)))
        now += rng.random() * 0.01
        for index in item.prompts:
            attempts[index] = attempts.get(index, 0) + 1
        if bad & set(item.prompts):
            dispatcher.fail(item, ValueError("bad prompt"), now, 0.001)
        elif rng.random() < 0.3:
            dispatcher.fail(item, InferenceHTTPError(503, "busy", "u"), now, 0.001)
        else:
            dispatcher.succeed(item, [f"r{i}" for i in item.prompts], 0.001)
    assert dispatcher.done
    results, errors, not_run = dispatcher.results, dispatcher.errors, dispatcher.not_run()
    completed = {i for i, r in enumerate(results) if r is not None}
    assert completed.isdisjoint(errors) and completed.isdisjoint(not_run) and set(errors).isdisjoint(not_run)
    assert completed | set(errors) | set(not_run) == set(range(len(tokens)))
    assert all(results[i] == f"r{i}" for i in completed)
    assert bad.isdisjoint(completed)
    if not stop_on_error:
        assert not not_run  # every prompt ran to a result or a final error
        assert bad <= set(errors)
        if batched:  # a bad prompt is isolated: it never takes a good one with it (unless transient retries ran out)
            permanent = {i for i, e in errors.items() if isinstance(e, ValueError)}
            assert permanent == bad
    stats = dispatcher.stats(now)
    assert stats.succeeded == len(completed) and stats.failed == len(errors) and stats.not_run == len(not_run)
    assert stats.calls == len(stats.latencies_s) and stats.max_in_flight <= limit
    if not batched:
        assert all(count <= max_retries + 1 for count in attempts.values())


def test_fifo_waits_for_the_budget_and_backfill_does_not() -> None:
    tokens = [60, 60, 10]
    for backfill, expected in ((False, [(0,)]), (True, [(0,), (2,)])):
        config = BatchConfig(max_tokens=100, dynamic_batching=backfill)
        dispatcher = Dispatcher([WorkItem((i,), (i,), t) for i, t in enumerate(tokens)], 3, config, max_in_flight=3)
        assert [item.prompts for item in dispatcher.start(0.0)] == expected


def test_an_oversize_item_runs_only_alone() -> None:
    config = BatchConfig(max_tokens=100)
    items = [WorkItem((0,), (0,), 10), WorkItem((1,), (1,), 500), WorkItem((2,), (2,), 10)]
    dispatcher = Dispatcher(items, 3, config, max_in_flight=3)
    first = dispatcher.start(0.0)
    assert [i.prompts for i in first] == [(0,), (2,)]
    for item in first:
        dispatcher.succeed(item, ["ok"], 0.0)
    assert [i.prompts for i in dispatcher.start(0.0)] == [(1,)]


def test_a_retry_waits_out_its_backoff_without_blocking_others() -> None:
    config = BatchConfig(retry_backoff=1.0, retry_backoff_max=1.0, retry_jitter=0.0, dynamic_batching=False)
    items = [WorkItem((i,), (i,), 1) for i in range(3)]
    dispatcher = Dispatcher(items, 3, config, max_in_flight=1)
    (first,) = dispatcher.start(0.0)
    dispatcher.fail(first, TimeoutError(), 0.0)
    assert dispatcher.next_ready_at(0.0) == 1.0
    (second,) = dispatcher.start(0.5)  # prompt 0 waits until t=1; prompt 1 goes first
    assert second.prompts == (1,)
    dispatcher.succeed(second, ["b"], 0.1)
    assert [i.prompts for i in dispatcher.start(1.0)] == [(0,)]
