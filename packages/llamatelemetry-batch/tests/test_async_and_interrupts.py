"""batch_infer and abatch_infer with async functions, timeouts, Ctrl-C and cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from llamatelemetry_batch import (
    BatchConfig,
    BatchInferenceError,
    BatchInferenceOptimizer,
    BatchInterrupted,
    CallTimeoutError,
)


class Recorder:
    """A one-prompt function that sleeps, records its prompts and counts the calls in flight.

    With ``expect``, calls hold until that many are in flight (or two seconds pass), so that a loaded machine
    still shows the concurrency it was given.
    """

    def __init__(self, delay: float, expect: int | None = None) -> None:
        self.delay, self.expect = delay, expect
        self.reached = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        self.calls: list[str] = []

    def __call__(self, prompt: str, **kwargs: Any) -> str:
        with self.lock:
            self.calls.append(prompt)
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


def test_a_sync_call_past_the_timeout_is_given_up() -> None:
    release = threading.Event()

    def fn(prompt: str) -> str:
        if prompt == "hang":
            release.wait(5)
        return prompt

    optimizer = BatchInferenceOptimizer(BatchConfig(timeout=0.1, max_retries=0))
    start = time.perf_counter()
    with pytest.raises(BatchInferenceError) as caught:
        optimizer.batch_infer(["a", "hang", "b"], fn)
    release.set()
    assert time.perf_counter() - start < 2.0
    assert caught.value.results == ["a", None, "b"]
    assert isinstance(caught.value.errors[1], CallTimeoutError)


def test_async_functions_are_awaited_with_bounded_concurrency() -> None:
    state = {"in_flight": 0, "max": 0}

    async def fn(prompt: str, suffix: str = "") -> str:
        state["in_flight"] += 1
        state["max"] = max(state["max"], state["in_flight"])
        await asyncio.sleep(0.01 * (len(prompt) % 3))
        state["in_flight"] -= 1
        return prompt + suffix

    prompts = [f"p{i}" * (i % 4 + 1) for i in range(25)]
    optimizer = BatchInferenceOptimizer(BatchConfig(max_batch_size=4))
    assert optimizer.batch_infer(prompts, fn, suffix="!") == [p + "!" for p in prompts]
    assert state["max"] == 4
    state["max"] = 0
    assert asyncio.run(optimizer.abatch_infer(prompts, fn, suffix="?")) == [p + "?" for p in prompts]
    assert state["max"] == 4


def test_batch_infer_with_an_async_function_inside_a_running_event_loop() -> None:
    # As in a notebook: the caller's thread runs an event loop, so batch_infer must not start another on it.
    async def fn(prompt: str) -> str:
        await asyncio.sleep(0)
        return prompt * 2

    async def caller() -> list[str]:
        return BatchInferenceOptimizer().batch_infer(["a", "b"], fn)

    assert asyncio.run(caller()) == ["aa", "bb"]


def test_an_async_call_past_the_timeout_is_cancelled() -> None:
    cancelled = []

    async def fn(prompt: str) -> str:
        try:
            await asyncio.sleep(5 if prompt == "slow" else 0)
        except asyncio.CancelledError:
            cancelled.append(prompt)
            raise
        return prompt

    optimizer = BatchInferenceOptimizer(BatchConfig(timeout=0.1, max_retries=0))
    with pytest.raises(BatchInferenceError) as from_sync:
        optimizer.batch_infer(["a", "slow"], fn)
    with pytest.raises(BatchInferenceError) as from_async:
        asyncio.run(optimizer.abatch_infer(["a", "slow"], fn))
    for caught in (from_sync, from_async):
        assert caught.value.results[0] == "a" and isinstance(caught.value.errors[1], CallTimeoutError)
    assert cancelled == ["slow", "slow"]


def test_abatch_infer_runs_sync_functions_in_threads() -> None:
    fn = Recorder(delay=0.02, expect=3)

    async def main() -> list[str]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            return await BatchInferenceOptimizer(BatchConfig(max_batch_size=3)).abatch_infer(["a", "b", "c", "d"], fn)
        finally:
            task.cancel()
            assert ticks >= 3  # the event loop kept running while the calls did

    assert asyncio.run(main()) == ["A", "B", "C", "D"]
    assert fn.max_in_flight == 3


def test_keyboard_interrupt_from_the_function_stops_new_calls() -> None:
    started: list[str] = []

    def fn(prompt: str) -> str:
        started.append(prompt)
        if prompt == "p2":
            raise KeyboardInterrupt
        return prompt

    with pytest.raises(BatchInterrupted) as caught:
        BatchInferenceOptimizer(BatchConfig(max_batch_size=1)).batch_infer([f"p{i}" for i in range(10)], fn)
    interrupted = caught.value
    assert isinstance(interrupted, KeyboardInterrupt)
    assert interrupted.results[:2] == ["p0", "p1"] and interrupted.completed_indices == [0, 1]
    assert interrupted.not_run == list(range(2, 10)) and started == ["p0", "p1", "p2"]


def test_keyboard_interrupt_under_abatch_infer() -> None:
    def fn(prompt: str) -> str:
        if prompt == "p1":
            raise KeyboardInterrupt
        return prompt

    optimizer = BatchInferenceOptimizer(BatchConfig(max_batch_size=1))
    with pytest.raises(BatchInterrupted) as caught:
        asyncio.run(optimizer.abatch_infer(["p0", "p1", "p2"], fn))
    assert caught.value.results == ["p0", None, None] and caught.value.not_run == [1, 2]


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """Python's own SIGINT handler for the test: a process started in the background of a non-interactive shell
    inherits SIGINT ignored, and Ctrl-C would then do nothing at all."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c_raises")
@pytest.mark.skipif(os.name != "posix" or threading.current_thread() is not threading.main_thread(), reason="SIGINT")
def test_ctrl_c_stops_new_calls_and_keeps_what_completed() -> None:
    fn = Recorder(delay=0.05)
    prompts = [f"p{i}" for i in range(40)]
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(0.23, signal.pthread_kill, args=(main, signal.SIGINT))
    timer.start()
    with pytest.raises(BatchInterrupted) as caught:
        BatchInferenceOptimizer(BatchConfig(max_batch_size=2)).batch_infer(prompts, fn)
    timer.join()
    calls_at_interrupt = len(fn.calls)
    time.sleep(0.15)
    assert len(fn.calls) == calls_at_interrupt  # nothing started after Ctrl-C
    done = caught.value.completed_indices
    assert 2 <= len(done) < 40 and all(caught.value.results[i] == prompts[i].upper() for i in done)
    assert len(caught.value.not_run) == 40 - len(done)


@pytest.mark.usefixtures("ctrl_c_raises")
@pytest.mark.skipif(os.name != "posix" or threading.current_thread() is not threading.main_thread(), reason="SIGINT")
def test_ctrl_c_stops_an_async_function_run_from_sync_code() -> None:
    started: list[str] = []
    cancelled: list[str] = []

    async def fn(prompt: str) -> str:
        started.append(prompt)
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            cancelled.append(prompt)
            raise
        return prompt

    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(0.23, signal.pthread_kill, args=(main, signal.SIGINT))
    timer.start()
    with pytest.raises(BatchInterrupted) as caught:
        BatchInferenceOptimizer(BatchConfig(max_batch_size=2)).batch_infer([f"p{i}" for i in range(40)], fn)
    timer.join()
    seen = len(started)
    time.sleep(0.1)
    assert len(started) == seen and len(cancelled) >= 1  # calls in flight were cancelled, none started after
    done = caught.value.completed_indices
    assert 2 <= len(done) < 40 and len(caught.value.not_run) == 40 - len(done)


def test_keyboard_interrupt_from_an_async_function() -> None:
    async def fn(prompt: str) -> str:
        if prompt == "p1":
            raise KeyboardInterrupt
        return prompt

    with pytest.raises(BatchInterrupted) as caught:
        BatchInferenceOptimizer(BatchConfig(max_batch_size=1)).batch_infer(["p0", "p1", "p2"], fn)
    assert caught.value.results == ["p0", None, None]
    # The background event loop survived: the next run works.
    assert BatchInferenceOptimizer().batch_infer(["x"], fn) == ["x"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_runs_batches_with_threads_of_its_own() -> None:
    async def twice(prompt: str) -> str:
        return prompt * 2

    optimizer = BatchInferenceOptimizer(BatchConfig(max_batch_size=2))
    assert optimizer.batch_infer(["a", "b", "c"], str.upper) == ["A", "B", "C"]  # the parent's pool and loop exist
    assert optimizer.batch_infer(["a"], twice) == ["aa"]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if both kinds of run complete
        code = 1
        try:
            ok = optimizer.batch_infer(["x", "y", "z"], str.upper) == ["X", "Y", "Z"]
            ok = ok and optimizer.batch_infer(["x"], twice) == ["xx"]
            code = 0 if ok else 1
        finally:
            os.write(write_end, bytes([code]))
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        start = time.monotonic()
        while time.monotonic() - start < 20:
            finished, status = os.waitpid(pid, os.WNOHANG)
            if finished:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in batch_infer")
        assert pipe.read() == b"\x00" and os.waitstatus_to_exitcode(status) == 0
