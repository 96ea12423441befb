"""Running a batch: calls in threads or on an event loop, driven by a :class:`~.dispatch.Dispatcher`.

A synchronous inference function runs in worker threads, one call at a time each (daemon threads: a call
that outlives its timeout or an interrupt cannot hold the program open). An ``async`` one runs on an event
loop: the caller's loop for ``abatch_infer``, and for ``batch_infer`` a background loop shared by every run
(so that an async client bound to that loop keeps working from one run to the next, and a caller that is
itself inside an event loop, such as a notebook, is not blocked by a nested ``asyncio.run``).

Whenever a call ends, its outcome goes to the dispatcher and whatever may start next is launched: by the
worker thread that ran the call (synchronous functions), or by the event loop's driver (async ones). A waiting
driver also wakes for deadlines and retries. The waits can be interrupted: ``KeyboardInterrupt`` (Ctrl-C, or raised by
the inference function) and cancellation of ``abatch_infer`` stop the run with what completed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llamatelemetry_batch.dispatch import Dispatcher, WorkItem
from llamatelemetry_batch.errors import BatchInterrupted, CallTimeoutError
from llamatelemetry_batch.progress import ProgressBar

__all__ = ["Job", "Outcome", "background_loop", "run_async", "run_sync"]


@dataclass
class Outcome:
    """How one call ended: its value, or the error it raised, and how long it took."""

    value: Any
    error: BaseException | None
    latency: float


@dataclass
class Job:
    """One validated run: the prompts, the function and its keyword arguments, and the dispatcher."""

    prompts: list[str]
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    takes_list: bool
    is_async: bool
    timeout: float | None
    dispatcher: Dispatcher
    progress: ProgressBar

    def argument(self, item: WorkItem) -> Any:
        if self.takes_list:
            return [self.prompts[i] for i in item.prompts]
        return self.prompts[item.prompts[0]]

    def results_of(self, item: WorkItem, value: Any) -> Sequence[Any]:
        """One result per prompt of ``item``; raise ``TypeError``/``ValueError`` for a malformed list answer."""
        if not self.takes_list:
            return [value]
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise TypeError(
                f"expected the batched inference function to return a sequence with one result per prompt, "
                f"got {type(value).__name__}"
            )
        if len(value) != len(item.prompts):
            raise ValueError(
                f"expected the batched inference function to return {len(item.prompts)} results for "
                f"{len(item.prompts)} prompts, got {len(value)}"
            )
        return value

    def interrupted(self, now: float) -> BatchInterrupted:
        d = self.dispatcher
        return BatchInterrupted(d.results, d.errors, d.not_run(), d.stats(now))


# --- calls -------------------------------------------------------------------------------------------------------


class _Workers:
    """Daemon threads that run synchronous calls, one call each at a time, shared by every run.

    A thread is started only when no worker is idle, so the pool holds about as many threads as calls ever ran
    at once (starting a thread per call costs more than the call's bookkeeping, and a function's per-thread
    state, such as a connection, survives from one run to the next). A call abandoned at its timeout keeps its
    worker until it returns; the pool grows past it.
    """

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, task: Callable[[], object]) -> None:
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._tasks.put(task)
        if spawn:
            threading.Thread(target=self._work, name="batch_infer-call", daemon=True).start()

    def _work(self) -> None:
        while True:
            task: object = self._tasks.get()
            while callable(task):  # a task may hand back the next one, which this thread then runs
                task = task()
            with self._lock:
                self._idle += 1


_workers = _Workers()


def _call(fn: Callable[..., Any], argument: Any, kwargs: dict[str, Any]) -> Outcome:
    start = time.perf_counter()
    try:
        value = fn(argument, **kwargs)
        if inspect.isawaitable(value):
            if inspect.iscoroutine(value):
                value.close()
            raise TypeError(
                "the inference function returned an awaitable from a plain call; declare it `async def` so "
                "that it is awaited on an event loop"
            )
    except BaseException as error:  # KeyboardInterrupt included: the driver stops the run on it
        return Outcome(None, error, time.perf_counter() - start)
    return Outcome(value, None, time.perf_counter() - start)


def _call_in_thread(
    fn: Callable[..., Any], argument: Any, kwargs: dict[str, Any], report: Callable[[Outcome], None]
) -> None:
    _workers.submit(lambda: report(_call(fn, argument, kwargs)))


async def _call_coroutine(
    fn: Callable[..., Any], argument: Any, kwargs: dict[str, Any], timeout: float | None
) -> Outcome:
    start = time.perf_counter()
    try:
        value = await asyncio.wait_for(fn(argument, **kwargs), timeout)
    except asyncio.TimeoutError as exc:
        elapsed = time.perf_counter() - start
        if timeout is None or elapsed < timeout:
            return Outcome(None, exc, elapsed)  # the function's own timeout, not ours
        error = CallTimeoutError(f"the call took longer than BatchConfig.timeout={timeout} s")
        return Outcome(None, error, elapsed)
    except (Exception, KeyboardInterrupt) as exc:  # a KeyboardInterrupt must not escape into the event loop
        return Outcome(None, exc, time.perf_counter() - start)
    return Outcome(value, None, time.perf_counter() - start)


_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def _forget_threads_after_fork() -> None:
    # A forked child has none of its parent's threads: a pool that counted idle workers, or a loop whose
    # thread is gone, would take work and never run it.
    global _workers, _loop, _loop_lock
    _workers = _Workers()
    _loop, _loop_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_threads_after_fork)


def background_loop() -> asyncio.AbstractEventLoop:
    """The event loop, running in a daemon thread, on which ``batch_infer`` awaits async inference functions."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="batch_infer-loop", daemon=True).start()
            _loop = loop
        return _loop


# --- the driver logic both loops share ---------------------------------------------------------------------------


@dataclass
class _Live:
    item: WorkItem
    deadline: float
    cancel: Callable[[], Any]


class _Driver:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.live: dict[int, _Live] = {}
        self._ids = itertools.count()
        # Async calls carry their own timeout (and are cancelled by it); a thread's is enforced here.
        self.thread_timeout = None if job.is_async else job.timeout
        # When launch_ready last asked the dispatcher what may start. The retries to wait for are those still
        # in their backoff then: one that became ready a moment later has not been started, and asking with a
        # later clock would drop its wake-up and leave it waiting forever (the run then never ends).
        self.launched_at = time.monotonic()

    def launch_ready(self, launch: Callable[[WorkItem, int], Callable[[], Any]]) -> None:
        now = time.monotonic()
        self.launched_at = now
        for item in self.job.dispatcher.start(now):
            call_id = next(self._ids)
            deadline = math.inf if self.thread_timeout is None else now + self.thread_timeout
            self.live[call_id] = _Live(item, deadline, launch(item, call_id))

    def wait_time(self) -> float | None:
        now = time.monotonic()
        retry_at = self.job.dispatcher.next_ready_at(self.launched_at)
        wake = math.inf if retry_at is None else retry_at
        if self.thread_timeout is not None and self.live:
            wake = min(wake, min(live.deadline for live in self.live.values()))
        # threading's waits take at most TIMEOUT_MAX seconds (a longer one raises OverflowError): wake then and
        # look again, as for any other wake-up.
        return None if wake == math.inf else min(max(0.0, wake - now), threading.TIMEOUT_MAX)

    def needs_timer(self) -> bool:
        """Whether a deadline or a retry may need the waiting thread to wake before the next call ends."""
        return self.thread_timeout is not None or self.job.dispatcher.next_ready_at(self.launched_at) is not None

    def expire(self) -> None:
        if self.thread_timeout is None:
            return
        now = time.monotonic()
        for call_id, live in list(self.live.items()):
            if live.deadline <= now:
                del self.live[call_id]
                live.cancel()
                error = CallTimeoutError(f"the call took longer than BatchConfig.timeout={self.job.timeout} s")
                self.job.progress.update(self.job.dispatcher.fail(live.item, error, now, None))

    def handle(self, call_id: int, outcome: Outcome) -> None:
        live = self.live.pop(call_id, None)
        if live is None:
            return  # a call given up earlier (timed out): its late answer is dropped
        if isinstance(outcome.error, KeyboardInterrupt):
            raise KeyboardInterrupt from outcome.error
        d, now = self.job.dispatcher, time.monotonic()
        if outcome.error is not None:
            self.job.progress.update(d.fail(live.item, outcome.error, now, outcome.latency))
            return
        try:
            results = self.job.results_of(live.item, outcome.value)
        except (TypeError, ValueError) as error:
            self.job.progress.update(d.fail(live.item, error, now, outcome.latency))
            return
        self.job.progress.update(d.succeed(live.item, results, outcome.latency))

    def abandon(self) -> None:
        for live in self.live.values():
            live.cancel()
        self.live.clear()
        self.job.dispatcher.interrupt()


def run_sync(job: Job) -> None:
    """Run ``job`` from the calling thread, which waits; see the module docstring.

    The worker that finishes a call reports it and starts what may start next itself, running the first of
    those calls in its own thread: a call never waits for the calling thread to be scheduled, which on a busy
    machine costs more than the call's bookkeeping. The calling thread wakes for timeouts, retries, the end of
    the run and Ctrl-C.

    Raises:
        BatchInterrupted: ``KeyboardInterrupt`` (Ctrl-C, or from the function) stopped the run.
    """
    if job.is_async:
        _run_on_background_loop(job)
        return
    driver = _Driver(job)
    lock = threading.Lock()  # guards the driver, the dispatcher and the progress bar
    wake = threading.Event()
    interrupted = False

    def start_ready() -> list[Callable[[], object]]:
        tasks: list[Callable[[], object]] = []

        def launch(item: WorkItem, call_id: int) -> Callable[[], Any]:
            argument = job.argument(item)
            tasks.append(lambda: after(call_id, _call(job.fn, argument, job.kwargs)))
            return lambda: None  # a thread cannot be stopped: its late result is dropped

        driver.launch_ready(launch)
        return tasks

    def after(call_id: int, outcome: Outcome) -> Callable[[], object] | None:
        nonlocal interrupted
        tasks: list[Callable[[], object]] = []
        with lock:
            if interrupted:
                return None
            try:
                driver.handle(call_id, outcome)
                tasks = start_ready()
            except KeyboardInterrupt:
                interrupted = True
                driver.abandon()
            needs_main = interrupted or job.dispatcher.done or driver.needs_timer()
        if needs_main:
            wake.set()
        for task in tasks[1:]:
            _workers.submit(task)
        return tasks[0] if tasks else None

    try:
        while True:
            wake.clear()
            with lock:
                if interrupted:
                    raise KeyboardInterrupt
                driver.expire()
                tasks = start_ready()
                if job.dispatcher.done:
                    return
                timeout = driver.wait_time()
            for task in tasks:
                _workers.submit(task)
            wake.wait(timeout)
    except KeyboardInterrupt:
        with lock:
            interrupted = True
            driver.abandon()
        raise job.interrupted(time.monotonic()) from None


def _run_on_background_loop(job: Job) -> None:
    # The whole run goes to the background loop (no thread hop per call); this thread only waits, and turns
    # Ctrl-C into a cancellation of the run there, then waits until the run has let go of its state.
    loop = background_loop()
    finished = threading.Event()
    state: dict[str, Any] = {"task": None, "cancel_early": False}

    async def run() -> bool:
        try:
            if state["cancel_early"]:
                return True
            state["task"] = asyncio.current_task()
            return await run_async(job)
        finally:
            finished.set()

    def cancel() -> None:
        if state["task"] is None:
            state["cancel_early"] = True  # the run has not started: it will stop at once
        else:
            state["task"].cancel()

    future = asyncio.run_coroutine_threadsafe(run(), loop)
    try:
        interrupted = future.result()
    except KeyboardInterrupt:
        loop.call_soon_threadsafe(cancel)
        finished.wait()
        interrupted = True
    except concurrent.futures.CancelledError:
        interrupted = True  # cancelled from elsewhere (the loop shutting down)
    if interrupted:
        raise job.interrupted(time.monotonic()) from None


async def run_async(job: Job) -> bool:
    """Run ``job`` on the running event loop; see the module docstring.

    Returns whether ``KeyboardInterrupt`` stopped the run (the caller raises ``job.interrupted``: a
    ``KeyboardInterrupt`` raised inside a task would escape its event loop). Cancellation is re-raised after the
    calls in flight are cancelled.
    """
    driver = _Driver(job)
    loop = asyncio.get_running_loop()
    completions: asyncio.Queue[tuple[int, Outcome]] = asyncio.Queue()

    def launch(item: WorkItem, call_id: int) -> Callable[[], Any]:
        if not job.is_async:

            def report(outcome: Outcome) -> None:
                # A closed loop means the run is long over and nobody waits for this answer.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(completions.put_nowait, (call_id, outcome))

            _call_in_thread(job.fn, job.argument(item), job.kwargs, report)
            return lambda: None
        task = loop.create_task(_call_coroutine(job.fn, job.argument(item), job.kwargs, job.timeout))
        task.add_done_callback(lambda t: None if t.cancelled() else completions.put_nowait((call_id, t.result())))
        return task.cancel

    try:
        while True:
            driver.launch_ready(launch)
            if job.dispatcher.done:
                return False
            try:
                call_id, outcome = await asyncio.wait_for(completions.get(), driver.wait_time())
            except asyncio.TimeoutError:
                driver.expire()
                continue
            driver.handle(call_id, outcome)
            driver.expire()
    except KeyboardInterrupt:
        driver.abandon()
        return True
    except asyncio.CancelledError:
        driver.abandon()
        raise
