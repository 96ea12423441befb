"""batch_infer with in-process inference functions: order, limits, failures, list functions, statistics."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamatelemetry_batch import (
    BatchConfig,
    BatchInferenceError,
    BatchInferenceOptimizer,
    OversizePromptWarning,
    batch_inference_optimized,
    batched,
)
from llamatelemetry_core.errors import ConfigurationError


class Recorder:
    """A one-prompt inference function that counts the calls in flight and records its arguments.

    With ``expect``, calls hold until that many are in flight at once (or two seconds pass), so that a loaded
    machine, where a thread may start later than another call ends, still shows the concurrency it was given.
    """

    def __init__(self, delay: float = 0.0, expect: int | None = None) -> None:
        self.delay = delay
        self.expect = expect
        self.reached = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, prompt: str, **kwargs: Any) -> str:
        with self.lock:
            self.calls.append((prompt, kwargs))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.expect is None or self.in_flight >= self.expect:
                self.reached.set()
        try:
            self.reached.wait(2.0)
            time.sleep(self.delay)
            return prompt.upper()
        finally:
            with self.lock:
                self.in_flight -= 1


def fast(**kwargs: Any) -> BatchConfig:
    return BatchConfig(retry_backoff=0.001, retry_backoff_max=0.01, **kwargs)


def test_the_guides_example_runs_as_written() -> None:
    class Engine:
        def infer(self, prompt: str) -> str:
            return f"answer to {prompt}"

    engine = Engine()
    config = BatchConfig(max_batch_size=8, max_tokens=2048, dynamic_batching=True)
    optimizer = BatchInferenceOptimizer(config)
    results = optimizer.batch_infer(prompts=["Prompt 1", "Prompt 2", "Prompt 3"], inference_fn=engine.infer)
    assert results == ["answer to Prompt 1", "answer to Prompt 2", "answer to Prompt 3"]
    assert batch_inference_optimized(prompts=["Hello", "World"], model=engine, max_batch_size=8) == [
        "answer to Hello",
        "answer to World",
    ]


def test_results_follow_prompt_order_and_kwargs_pass_through() -> None:
    fn = Recorder()
    prompts = [f"p{i}" for i in range(30)]
    results = BatchInferenceOptimizer(BatchConfig(max_batch_size=5)).batch_infer(prompts, fn, temperature=0.5, n=2)
    assert results == [p.upper() for p in prompts]
    assert sorted(p for p, _ in fn.calls) == sorted(prompts)
    assert all(kwargs == {"temperature": 0.5, "n": 2} for _, kwargs in fn.calls)


@pytest.mark.parametrize("max_batch_size", [1, 4, 16])
def test_concurrency_reaches_but_never_exceeds_max_batch_size(max_batch_size: int) -> None:
    fn = Recorder(delay=0.02, expect=max_batch_size)
    prompts = [f"p{i}" for i in range(2 * max_batch_size + 3)]
    optimizer = BatchInferenceOptimizer(BatchConfig(max_batch_size=max_batch_size))
    assert optimizer.batch_infer(prompts, fn) == [p.upper() for p in prompts]
    assert fn.max_in_flight == max_batch_size
    stats = optimizer.last_stats
    assert stats is not None and stats.succeeded == len(prompts) and stats.max_in_flight == max_batch_size


def test_the_token_budget_limits_what_runs_together() -> None:
    fn = Recorder(delay=0.02, expect=2)
    prompts = ["x" * 400] * 6  # 100 tokens each by the default estimate; 250 allows two at once
    BatchInferenceOptimizer(BatchConfig(max_batch_size=8, max_tokens=250)).batch_infer(prompts, fn)
    assert fn.max_in_flight == 2
    words = BatchConfig(max_batch_size=8, max_tokens=4, token_estimator=lambda s: len(s.split()))
    fn = Recorder(delay=0.02, expect=2)
    BatchInferenceOptimizer(words).batch_infer(["a b", "c d", "e f", "g h"], fn)
    assert fn.max_in_flight == 2


def test_an_oversize_prompt_runs_alone_with_a_warning() -> None:
    fn = Recorder(delay=0.01)
    with pytest.warns(OversizePromptWarning, match="1 prompt"):
        results = BatchInferenceOptimizer(BatchConfig(max_tokens=10)).batch_infer(["a", "y" * 400, "b"], fn)
    assert results == ["A", "Y" * 400, "B"]


def test_empty_prompts_make_no_call() -> None:
    def fn(prompt: str) -> str:
        raise AssertionError("called")

    optimizer = BatchInferenceOptimizer()
    assert optimizer.batch_infer([], fn) == []
    assert asyncio.run(optimizer.abatch_infer([], fn)) == []
    assert optimizer.last_stats is not None and optimizer.last_stats.prompts == 0


@pytest.mark.parametrize("prompts", [["ok", 3, "ok"], ["ok", None], "a single string", {"a": 1}, 42])
def test_bad_prompts_raise_type_error_before_any_call(prompts: Any) -> None:
    fn = Recorder()
    with pytest.raises(TypeError, match="prompt"):
        BatchInferenceOptimizer().batch_infer(prompts, fn)
    assert fn.calls == []


def test_a_non_callable_function_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="inference_fn"):
        BatchInferenceOptimizer().batch_infer(["a"], "not a function")  # type: ignore[call-overload]


def test_a_failing_prompt_never_loses_the_others() -> None:
    def fn(prompt: str) -> str:
        if prompt.startswith("bad"):
            raise ValueError(f"cannot answer {prompt}")
        return prompt.upper()

    with pytest.raises(BatchInferenceError) as caught:
        BatchInferenceOptimizer(fast()).batch_infer(["a", "bad1", "b", "bad2"], fn)
    error = caught.value
    assert error.results == ["A", None, "B", None]
    assert error.failed_indices == [1, 3] and error.completed_indices == [0, 2] and error.not_run == []
    assert "cannot answer bad1" in str(error.errors[1]) and "2 of 4 prompts failed" in str(error)
    assert error.stats.failed == 2 and error.stats.retries == 0  # a ValueError is not transient
    assert isinstance(error, RuntimeError)


def test_stop_on_error_starts_nothing_after_the_first_failure() -> None:
    fn = Recorder()

    def failing(prompt: str) -> str:
        if prompt == "p3":
            raise ValueError("boom")
        return fn(prompt)

    prompts = [f"p{i}" for i in range(20)]
    with pytest.raises(BatchInferenceError) as caught:
        BatchInferenceOptimizer(fast(max_batch_size=1, stop_on_error=True)).batch_infer(prompts, failing)
    error = caught.value
    assert error.results[:3] == ["P0", "P1", "P2"] and error.failed_indices == [3]
    assert error.not_run == list(range(4, 20)) and len(fn.calls) == 3


def test_transient_errors_are_retried() -> None:
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def flaky(prompt: str) -> str:
        with lock:
            seen[prompt] = seen.get(prompt, 0) + 1
            first = seen[prompt] == 1
        if first:
            raise ConnectionResetError("dropped")
        return prompt

    optimizer = BatchInferenceOptimizer(fast(max_batch_size=3))
    assert optimizer.batch_infer(["a", "b", "c", "d"], flaky) == ["a", "b", "c", "d"]
    stats = optimizer.last_stats
    assert stats is not None and stats.retries == 4 and stats.calls == 8 and stats.failed == 0


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(0, 30),
    max_batch_size=st.integers(1, 8),
    failing=st.sets(st.integers(0, 29), max_size=6),
    flaky=st.sets(st.integers(0, 29), max_size=6),
    use_batched=st.booleans(),
)
def test_every_prompt_ends_with_its_own_result_or_its_own_error(
    n: int, max_batch_size: int, failing: set[int], flaky: set[int], use_batched: bool
) -> None:
    prompts = [f"p{i}" for i in range(n)]
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    def answer(prompt: str) -> str:
        index = int(prompt[1:])
        with lock:
            attempts[prompt] = attempts.get(prompt, 0) + 1
            first = attempts[prompt] == 1
        if index in failing:
            raise ValueError(prompt)
        if index in flaky and first:
            raise TimeoutError(prompt)
        return prompt.upper()

    @batched
    def answer_many(batch: list[str]) -> list[str]:
        return [answer(p) for p in batch]

    fn: Any = answer_many if use_batched else answer
    optimizer = BatchInferenceOptimizer(fast(max_batch_size=max_batch_size))
    bad = {i for i in failing if i < n}
    try:
        results = optimizer.batch_infer(prompts, fn)
        errors: dict[int, BaseException] = {}
    except BatchInferenceError as error:
        results, errors = error.results, error.errors
    assert set(errors) == bad
    assert all(isinstance(e, ValueError) and str(e) == prompts[i] for i, e in errors.items())
    assert results == [None if i in bad else p.upper() for i, p in enumerate(prompts)]


def test_batched_functions_get_batches_within_both_limits() -> None:
    batches: list[list[str]] = []

    @batched
    def generate(prompts: list[str], prefix: str = "") -> list[str]:
        batches.append(prompts)
        return [prefix + p.upper() for p in prompts]

    prompts = ["a" * (4 * n) for n in (1, 30, 2, 29, 3, 28, 1, 1, 1, 1, 1)]  # 1..30 tokens each
    config = BatchConfig(max_batch_size=4, max_tokens=64)
    results = BatchInferenceOptimizer(config).batch_infer(prompts, generate, prefix="> ")
    assert results == ["> " + p.upper() for p in prompts]
    assert all(1 <= len(b) <= 4 and len(b) * max(len(p) // 4 for p in b) <= 64 for b in batches)
    assert sorted(p for b in batches for p in b) == sorted(prompts)
    longs = [b for b in batches if any(len(p) > 100 for p in b)]
    assert all(all(len(p) > 100 for p in b) for b in longs)  # grouped by length: no short prompt padded to 30


def test_batched_without_dynamic_batching_keeps_order() -> None:
    batches: list[list[str]] = []

    @batched
    def generate(prompts: list[str]) -> list[str]:
        batches.append(prompts)
        return prompts

    prompts = [f"p{i}" for i in range(7)]
    BatchInferenceOptimizer(BatchConfig(max_batch_size=3, dynamic_batching=False)).batch_infer(prompts, generate)
    assert batches == [prompts[0:3], prompts[3:6], prompts[6:7]]


def test_a_bad_prompt_in_a_batch_fails_alone() -> None:
    @batched
    def generate(prompts: list[str]) -> list[str]:
        if "bad" in prompts:
            raise ValueError("the model rejects 'bad'")
        return [p.upper() for p in prompts]

    prompts = ["a", "b", "bad", "c", "d", "e"]
    with pytest.raises(BatchInferenceError) as caught:
        BatchInferenceOptimizer(BatchConfig(max_batch_size=6)).batch_infer(prompts, generate)
    assert caught.value.results == ["A", "B", None, "C", "D", "E"] and caught.value.failed_indices == [2]


def test_a_batched_answer_of_the_wrong_length_fails_its_prompts() -> None:
    @batched
    def generate(prompts: list[str]) -> Sequence[str]:
        return prompts[:-1] if len(prompts) > 1 else "not a list"

    with pytest.raises(BatchInferenceError) as caught:
        BatchInferenceOptimizer(BatchConfig(max_batch_size=2)).batch_infer(["a", "b"], generate)
    assert set(caught.value.failed_indices) == {0, 1}
    assert isinstance(caught.value.errors[0], TypeError)


def test_async_batched_functions() -> None:
    @batched
    async def generate(prompts: list[str]) -> list[int]:
        await asyncio.sleep(0)
        return [len(p) for p in prompts]

    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    optimizer = BatchInferenceOptimizer(BatchConfig(max_batch_size=2))
    assert optimizer.batch_infer(prompts, generate) == [1, 2, 3, 4, 5]
    assert asyncio.run(optimizer.abatch_infer(prompts, generate)) == [1, 2, 3, 4, 5]
    assert optimizer.last_stats is not None and optimizer.last_stats.calls == 3


def test_statistics_after_a_run() -> None:
    optimizer = BatchInferenceOptimizer(BatchConfig(max_batch_size=4))
    optimizer.batch_infer([f"p{i}" for i in range(8)], Recorder(delay=0.02))
    stats = optimizer.last_stats
    assert stats is not None
    assert stats.prompts == 8 and stats.succeeded == 8 and stats.calls == 8 and stats.retries == 0
    assert 0.02 <= stats.latency_p50_s <= stats.latency_p90_s <= stats.latency_p99_s < 1.0
    assert stats.requests_per_s > 0 and stats.wall_time_s >= 0.04
    summary = stats.as_dict()
    assert summary["latency_s"]["p50"] == stats.latency_p50_s and "latencies_s" not in summary
    assert "8/8 prompts" in str(stats)


def test_progress_bar_with_tqdm(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tqdm")
    results = BatchInferenceOptimizer(BatchConfig(progress="tqdm")).batch_infer(["a", "b", "c"], str.upper)
    assert results == ["A", "B", "C"]
    assert "3/3" in capsys.readouterr().err


def test_progress_bar_with_rich() -> None:
    pytest.importorskip("rich")
    results = BatchInferenceOptimizer(BatchConfig(progress="rich")).batch_infer(["a", "b"], str.upper)
    assert results == ["A", "B"]


def test_a_missing_progress_library_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    with pytest.raises(ImportError, match=r"llamatelemetry-batch\[progress\]"):
        BatchInferenceOptimizer(BatchConfig(progress=True)).batch_infer(["a"], str.upper)


def test_batch_inference_optimized_finds_the_models_method() -> None:
    class WithGenerate:
        def generate(self, prompt: str, suffix: str = "") -> str:
            return "g:" + prompt + suffix

    class Both(WithGenerate):
        def infer(self, prompt: str) -> str:
            return "i:" + prompt

    assert batch_inference_optimized(["a"], Both()) == ["i:a"]
    assert batch_inference_optimized(["a"], WithGenerate(), suffix="!") == ["g:a!"]
    assert batch_inference_optimized(["a"], lambda p: "c:" + p) == ["c:a"]
    fn = Recorder(delay=0.02, expect=3)
    batch_inference_optimized([f"p{i}" for i in range(9)], fn, max_batch_size=3)
    assert fn.max_in_flight == 3
    fn = Recorder(delay=0.02, expect=2)
    batch_inference_optimized([f"p{i}" for i in range(9)], fn, config=BatchConfig(max_batch_size=2))
    assert fn.max_in_flight == 2
    with pytest.raises(TypeError, match=r"infer\(prompt\) or generate\(prompt\)"):
        batch_inference_optimized(["a"], object())


def test_a_sync_function_returning_a_coroutine_is_reported() -> None:
    async def answer(prompt: str) -> str:
        return prompt

    with pytest.raises(BatchInferenceError) as caught:
        BatchInferenceOptimizer().batch_infer(["a"], lambda p: answer(p))
    assert "async def" in str(caught.value.errors[0])


def test_a_timeout_longer_than_threading_can_wait_is_no_limit() -> None:
    # threading's waits take at most TIMEOUT_MAX seconds; a longer timeout raised OverflowError in the waiting loop.
    optimizer = BatchInferenceOptimizer(BatchConfig(timeout=1e300, max_batch_size=2))
    assert optimizer.batch_infer(["a", "bb", "c"], batched(lambda ps: [p * 2 for p in ps])) == ["aa", "bbbb", "cc"]


def test_progress_takes_booleans_and_bar_names_only() -> None:
    for value in (0, 1, 0.0, "yes"):
        with pytest.raises(ConfigurationError, match="progress"):
            BatchConfig(progress=value)  # type: ignore[arg-type]


def test_a_retry_that_becomes_ready_while_a_call_is_reported_is_still_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # A clock that moves 10 ms at every reading, and a 15 ms backoff: the retry is not ready when the worker
    # asks what may start, and is ready by the next reading. The run must still wake for it (it once hung here,
    # with every thread idle, about one run in a few hundred on a real clock with a 1 ms backoff).
    import llamatelemetry_batch.runner as runner_module

    ticks = iter(range(10**9))

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return 1000.0 + next(ticks) * 0.010

        perf_counter = staticmethod(time.perf_counter)

    monkeypatch.setattr(runner_module, "time", Clock)
    attempts: dict[str, int] = {}

    def flaky(prompt: str) -> str:
        attempts[prompt] = attempts.get(prompt, 0) + 1
        if attempts[prompt] == 1:
            raise TimeoutError(prompt)
        return prompt.upper()

    config = BatchConfig(max_batch_size=1, retry_backoff=0.015, retry_backoff_max=0.015, retry_jitter=0.0)
    outcome: list[Any] = []
    thread = threading.Thread(
        target=lambda: outcome.append(BatchInferenceOptimizer(config).batch_infer(["a"], flaky)), daemon=True
    )
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the run never ended: a ready retry was left waiting"
    assert outcome == [["A"]] and attempts == {"a": 2}
