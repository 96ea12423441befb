"""Errors of batch inference and of the OpenAI-compatible HTTP client.

A failed run never loses what succeeded: :class:`BatchInferenceError` and :class:`BatchInterrupted` carry the
results of every prompt that completed (in prompt order, ``None`` where there is none), the error of each
prompt that failed, and the run's statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llamatelemetry_core.errors import LlamaTelemetryError

if TYPE_CHECKING:
    from llamatelemetry_batch.stats import BatchStats

__all__ = [
    "BatchInferenceError",
    "BatchInterrupted",
    "CallTimeoutError",
    "InferenceConnectionError",
    "InferenceHTTPError",
    "InferenceResponseError",
    "InferenceTimeoutError",
]


class _PartialResults:
    """What a stopped or partly failed run leaves: results, errors, prompts never run, statistics."""

    results: list[Any]
    errors: dict[int, BaseException]
    not_run: list[int]
    stats: BatchStats

    def _set_partial(
        self, results: Sequence[Any], errors: Mapping[int, BaseException], not_run: Sequence[int], stats: BatchStats
    ) -> None:
        self.results = list(results)
        self.errors = dict(sorted(errors.items()))
        self.not_run = sorted(not_run)
        self.stats = stats

    @property
    def failed_indices(self) -> list[int]:
        """Indices (into the prompts) of the prompts whose call failed, ascending."""
        return list(self.errors)

    @property
    def completed_indices(self) -> list[int]:
        """Indices of the prompts that have a result, ascending."""
        done = set(range(len(self.results))) - set(self.errors) - set(self.not_run)
        return sorted(done)


def _describe(errors: Mapping[int, BaseException], limit: int = 3) -> str:
    shown = "; ".join(f"prompt {i}: {type(e).__name__}: {e}" for i, e in list(errors.items())[:limit])
    more = f"; and {len(errors) - limit} more" if len(errors) > limit else ""
    return shown + more


class BatchInferenceError(_PartialResults, LlamaTelemetryError, RuntimeError):
    """Some prompts failed (after their retries). Every other prompt's result is kept.

    Attributes:
        results: one entry per prompt, in prompt order: the result, or ``None`` for a prompt that failed or
            did not run.
        errors: ``{prompt index: exception}`` for each failed prompt, ascending.
        failed_indices: the keys of ``errors``.
        not_run: indices of the prompts that were never called (``stop_on_error`` stopped the run first).
        completed_indices: indices of the prompts that have a result.
        stats: the run's :class:`~llamatelemetry_batch.stats.BatchStats`.
    """

    def __init__(
        self,
        results: Sequence[Any],
        errors: Mapping[int, BaseException],
        not_run: Sequence[int],
        stats: BatchStats,
    ) -> None:
        self._set_partial(results, errors, not_run, stats)
        stopped = f"; stopped at the first error, {len(self.not_run)} prompts not run" if self.not_run else ""
        super().__init__(
            f"{len(self.errors)} of {len(self.results)} prompts failed{stopped} ({_describe(self.errors)}); "
            "the other results are in .results, the failures in .errors"
        )


class BatchInterrupted(_PartialResults, KeyboardInterrupt):
    """The run was interrupted (Ctrl-C, or the inference function raised ``KeyboardInterrupt``).

    No call starts after the interrupt. It derives from ``KeyboardInterrupt``, so an uncaught one still stops
    the program; catch it to keep what completed (the same attributes as :class:`BatchInferenceError`, with
    ``not_run`` listing every prompt without a result or an error, including calls that were cut off).
    """

    def __init__(
        self,
        results: Sequence[Any],
        errors: Mapping[int, BaseException],
        not_run: Sequence[int],
        stats: BatchStats,
    ) -> None:
        self._set_partial(results, errors, not_run, stats)
        super().__init__(
            f"batch inference interrupted: {len(self.completed_indices)} of {len(self.results)} prompts completed, "
            f"{len(self.errors)} failed, {len(self.not_run)} not run; the completed results are in .results"
        )


class CallTimeoutError(LlamaTelemetryError, TimeoutError):
    """One call of the inference function took longer than ``BatchConfig.timeout``.

    An ``async`` call is cancelled; a synchronous call cannot be stopped from outside its thread, so it is
    abandoned (its late result is discarded): give the function its own timeout too (the HTTP client has one).
    """


class InferenceHTTPError(LlamaTelemetryError, RuntimeError):
    """The inference server answered with an HTTP error status.

    Attributes:
        status_code: the HTTP status.
        body: the start of the response body (at most 500 characters), which usually says why.
        url: the URL that was requested.
        retry_after: seconds from the server's ``Retry-After`` header, if it sent a number.
        transient: whether retrying may help (408, 409, 425, 429 and 5xx).
    """

    TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})

    def __init__(self, status_code: int, body: str, url: str, retry_after: float | None = None) -> None:
        self.status_code = status_code
        self.body = body
        self.url = url
        self.retry_after = retry_after
        super().__init__(f"HTTP {status_code} from {url}: {body}")

    @property
    def transient(self) -> bool:
        return self.status_code in self.TRANSIENT_STATUSES or self.status_code >= 500


class InferenceConnectionError(LlamaTelemetryError, ConnectionError):
    """The inference server could not be reached, or dropped the connection (is it running at that URL?)."""


class InferenceTimeoutError(LlamaTelemetryError, TimeoutError):
    """The inference server did not answer within the HTTP client's timeout."""


class InferenceResponseError(LlamaTelemetryError, ValueError):
    """The server's answer is not the OpenAI-compatible JSON that was expected (the message quotes it)."""
