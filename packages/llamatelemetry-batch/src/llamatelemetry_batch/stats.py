"""Statistics of one batch run: throughput, call latency percentiles, failures and retries."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["BatchStats", "percentile"]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ascending values, linearly interpolated; ``nan`` when empty."""
    if not sorted_values:
        return math.nan
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


@dataclass(frozen=True)
class BatchStats:
    """What one run of ``batch_infer`` did.

    Attributes:
        prompts: prompts given.
        succeeded: prompts with a result.
        failed: prompts whose call failed for good (after retries).
        not_run: prompts never called (stopped at the first error, or interrupted).
        calls: calls of the inference function, retries included (one per batch for a list function).
        retries: calls that were retries of a failed call.
        wall_time_s: seconds from the first call to the end of the run.
        requests_per_s: ``succeeded / wall_time_s``.
        latencies_s: the duration of every call that returned, in completion order.
        max_in_flight: the most calls that were running at once.
    """

    prompts: int
    succeeded: int
    failed: int
    not_run: int
    calls: int
    retries: int
    wall_time_s: float
    latencies_s: tuple[float, ...]
    max_in_flight: int

    @property
    def requests_per_s(self) -> float:
        return self.succeeded / self.wall_time_s if self.wall_time_s > 0 else math.nan

    def latency_percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) of the call latencies, in seconds (``nan`` without calls)."""
        return percentile(sorted(self.latencies_s), q)

    @property
    def latency_p50_s(self) -> float:
        return self.latency_percentile(50)

    @property
    def latency_p90_s(self) -> float:
        return self.latency_percentile(90)

    @property
    def latency_p99_s(self) -> float:
        return self.latency_percentile(99)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (latencies as percentiles, not every sample)."""
        summary = asdict(self)
        del summary["latencies_s"]
        lat = sorted(self.latencies_s)
        summary.update(
            requests_per_s=self.requests_per_s,
            latency_s={
                "mean": sum(lat) / len(lat) if lat else math.nan,
                "p50": percentile(lat, 50),
                "p90": percentile(lat, 90),
                "p99": percentile(lat, 99),
                "max": lat[-1] if lat else math.nan,
            },
        )
        return summary

    def __str__(self) -> str:
        return (
            f"{self.succeeded}/{self.prompts} prompts in {self.wall_time_s:.3f} s ({self.requests_per_s:.1f}/s), "
            f"{self.failed} failed, {self.not_run} not run, {self.calls} calls ({self.retries} retries), "
            f"latency p50 {self.latency_p50_s * 1e3:.1f} ms p90 {self.latency_p90_s * 1e3:.1f} ms "
            f"p99 {self.latency_p99_s * 1e3:.1f} ms, at most {self.max_in_flight} in flight"
        )
