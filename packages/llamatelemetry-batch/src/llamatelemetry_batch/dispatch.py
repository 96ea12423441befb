"""The bookkeeping of a batch run, apart from threads and event loops: what starts now, what is retried.

A run is a queue of work items: one prompt each for a one-prompt inference function, one planned batch each
for a list function (:func:`plan_batches`). :class:`Dispatcher` decides, whenever something changes, which
items start: at most ``max_in_flight`` calls at once, and the estimated tokens in flight within ``max_tokens``
(an item over the budget runs alone). With ``backfill`` an item that does not fit is skipped for a later one
that does; without it, items start strictly in order. A failed item is retried after a backoff when its error
is transient and it has retries left; a batch that fails for another reason is split in two so that one bad
prompt fails alone; otherwise its prompts fail for good. The drivers in :mod:`llamatelemetry_batch.runner`
(threads, an event loop) only launch what the dispatcher says and report back.

Pure Python, no clock of its own (``now`` is passed in): it is tested with property tests.
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llamatelemetry_batch.config import BatchConfig
from llamatelemetry_batch.retry import backoff_delay
from llamatelemetry_batch.stats import BatchStats

__all__ = ["Dispatcher", "WorkItem", "plan_batches"]


def plan_batches(tokens: Sequence[int], max_batch_size: int, max_tokens: int, *, by_length: bool) -> list[list[int]]:
    """Cut prompts into batches of at most ``max_batch_size`` prompts and ``len(batch) * longest <= max_tokens``.

    ``tokens[i]`` is prompt ``i``'s estimated length. With ``by_length`` prompts are taken shortest first, so a
    batch holds prompts of similar length (little padding); otherwise in the given order. A prompt longer than
    ``max_tokens`` forms a batch of its own. Returns prompt indices, each exactly once.
    """
    order = sorted(range(len(tokens)), key=lambda i: (tokens[i], i)) if by_length else range(len(tokens))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        grown = max(longest, tokens[index])
        if current and (len(current) == max_batch_size or (len(current) + 1) * grown > max_tokens):
            batches.append(current)
            current, grown = [], tokens[index]
        current.append(index)
        longest = grown
    if current:
        batches.append(current)
    return batches


@dataclass(eq=False)
class WorkItem:
    """One call to make: the prompts it covers (indices into the run's prompts) and its token cost."""

    order: tuple[int, ...]
    prompts: tuple[int, ...]
    tokens: int
    calls: int = 0
    retries: int = 0
    ready_at: float = 0.0

    def __lt__(self, other: WorkItem) -> bool:
        return self.order < other.order


@dataclass
class _Counters:
    calls: int = 0
    retries: int = 0
    latencies: list[float] = field(default_factory=list)
    max_in_flight: int = 0
    started_at: float | None = None


class Dispatcher:
    """Decides which work items start, and what happens to each item that returns or fails.

    Args:
        items: the work, in the order it should start.
        num_prompts: prompts in the run (the length of ``results``).
        config: limits (``max_tokens``), retry policy (``max_retries``, backoff, ``retry_on``),
            ``stop_on_error``, and ``dynamic_batching`` (which enables backfill).
        max_in_flight: the most calls at once.
        batch_tokens: ``batch_tokens(prompt indices) -> cost``, used to price the halves of a split batch;
            ``None`` means items are never split (one-prompt functions).
        rng: the source of backoff jitter.
    """

    def __init__(
        self,
        items: Sequence[WorkItem],
        num_prompts: int,
        config: BatchConfig,
        *,
        max_in_flight: int,
        batch_tokens: Callable[[Sequence[int]], int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.max_in_flight = max_in_flight
        self.backfill = config.dynamic_batching
        self._batch_tokens = batch_tokens
        self._rng = rng or random.Random()
        self._pending: list[WorkItem] = sorted(items)
        self._in_flight: set[WorkItem] = set()
        self._in_flight_tokens = 0
        self._wakeups: list[float] = []  # ready times of retries waiting out their backoff (a heap)
        self.results: list[Any] = [None] * num_prompts
        self.errors: dict[int, BaseException] = {}
        self._completed: set[int] = set()
        self.stopped = False
        self._counters = _Counters()

    # --- queries -----------------------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """No call in flight and nothing left that may start."""
        return not self._in_flight and (self.stopped or not self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def in_flight_tokens(self) -> int:
        return self._in_flight_tokens

    def next_ready_at(self, now: float) -> float | None:
        """When the next retry that is still waiting out its backoff at ``now`` becomes ready (or ``None``)."""
        while self._wakeups and self._wakeups[0] <= now:
            heapq.heappop(self._wakeups)
        return None if self.stopped or not self._wakeups else self._wakeups[0]

    def not_run(self) -> list[int]:
        """Prompts with neither a result nor an error."""
        return [i for i in range(len(self.results)) if i not in self._completed and i not in self.errors]

    def stats(self, now: float) -> BatchStats:
        counters = self._counters
        started = counters.started_at if counters.started_at is not None else now
        return BatchStats(
            prompts=len(self.results),
            succeeded=len(self._completed),
            failed=len(self.errors),
            not_run=len(self.results) - len(self._completed) - len(self.errors),
            calls=counters.calls,
            retries=counters.retries,
            wall_time_s=max(0.0, now - started),
            latencies_s=tuple(counters.latencies),
            max_in_flight=counters.max_in_flight,
        )

    # --- transitions ------------------------------------------------------------------------------------------------

    def start(self, now: float) -> list[WorkItem]:
        """Take the items that may start at ``now`` out of the queue and count them in flight."""
        started: list[WorkItem] = []
        position = 0
        while not self.stopped and position < len(self._pending) and len(self._in_flight) < self.max_in_flight:
            item = self._pending[position]
            if item.ready_at > now:
                position += 1  # a retry waiting out its backoff blocks nobody
                continue
            if not self._fits(item):
                if not self.backfill:
                    break
                position += 1
                continue
            del self._pending[position]
            self._launch(item, now)
            started.append(item)
        return started

    def succeed(self, item: WorkItem, results: Sequence[Any], latency: float) -> int:
        """Record the results of ``item``'s prompts (one per prompt, in ``item.prompts`` order).

        Returns the number of prompts finished by this call.
        """
        self._land(item, latency)
        for index, result in zip(item.prompts, results, strict=True):
            self.results[index] = result
            self._completed.add(index)
        return len(item.prompts)

    def fail(self, item: WorkItem, error: BaseException, now: float, latency: float | None = None) -> int:
        """Record a failed call of ``item``: retry it, split it, or fail its prompts for good.

        Returns the number of prompts that failed for good.
        """
        self._land(item, latency)
        if self.stopped:
            return self._fail_for_good(item, error)
        if item.retries < self.config.max_retries and self.config.is_retryable(error):
            item.retries += 1
            item.ready_at = now + backoff_delay(
                item.retries,
                backoff=self.config.retry_backoff,
                backoff_max=self.config.retry_backoff_max,
                jitter=self.config.retry_jitter,
                rng=self._rng,
                error=error,
            )
            bisect.insort(self._pending, item)
            heapq.heappush(self._wakeups, item.ready_at)
            return 0
        if self._batch_tokens is not None and len(item.prompts) > 1 and not self.config.stop_on_error:
            # The error may belong to one prompt: run each half again so that it fails alone.
            middle = len(item.prompts) // 2
            for number, half in enumerate((item.prompts[:middle], item.prompts[middle:])):
                part = WorkItem(order=(*item.order, number), prompts=half, tokens=self._batch_tokens(half))
                part.ready_at = now
                bisect.insort(self._pending, part)
            return 0
        failed = self._fail_for_good(item, error)
        if self.config.stop_on_error:
            self.stopped = True
        return failed

    def interrupt(self) -> None:
        """Start nothing more; the calls in flight are given up (their prompts count as not run)."""
        self.stopped = True
        self._in_flight.clear()
        self._in_flight_tokens = 0

    # --- internals --------------------------------------------------------------------------------------------------

    def _fits(self, item: WorkItem) -> bool:
        if item.tokens > self.config.max_tokens:
            return not self._in_flight  # over the budget alone: runs, but only by itself
        return self._in_flight_tokens + item.tokens <= self.config.max_tokens

    def _launch(self, item: WorkItem, now: float) -> None:
        counters = self._counters
        if counters.started_at is None:
            counters.started_at = now
        counters.calls += 1
        if item.calls:
            counters.retries += 1
        item.calls += 1
        self._in_flight.add(item)
        self._in_flight_tokens += item.tokens
        counters.max_in_flight = max(counters.max_in_flight, len(self._in_flight))

    def _land(self, item: WorkItem, latency: float | None) -> None:
        if item not in self._in_flight:
            raise RuntimeError("a call was reported that is not in flight (reported twice, or after interrupt)")
        self._in_flight.remove(item)
        self._in_flight_tokens -= item.tokens
        if latency is not None:
            self._counters.latencies.append(latency)

    def _fail_for_good(self, item: WorkItem, error: BaseException) -> int:
        for index in item.prompts:
            self.errors[index] = error
        return len(item.prompts)
