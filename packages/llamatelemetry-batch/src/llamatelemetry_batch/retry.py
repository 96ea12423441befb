"""Which errors are worth retrying, and how long to wait before the next attempt.

Transient by default: timeouts (``TimeoutError``, including this package's call and HTTP timeouts),
connection failures (``ConnectionError``), HTTP 408/409/425/429 and 5xx answers
(:class:`~llamatelemetry_batch.errors.InferenceHTTPError`), and the same situations raised by an inference
function that uses httpx or requests directly. Anything else (a bad request, a bug in the function) fails at
once: retrying it would only repeat it.

The wait before retry ``n`` (1-based) is exponential with jitter::

    delay = min(backoff_max, backoff * 2 ** (n - 1)) * uniform(1 - jitter, 1)

so that a crowd of clients that failed together does not come back together; a ``Retry-After`` the server sent
is honoured as a lower bound (capped at ``backoff_max``).
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Callable

from llamatelemetry_batch.errors import InferenceHTTPError

__all__ = ["RetryPredicate", "backoff_delay", "is_transient_error"]

RetryPredicate = Callable[[BaseException], bool]


def is_transient_error(error: BaseException) -> bool:
    """Whether ``error`` is one that a later attempt may not meet (the default of ``BatchConfig.retry_on``)."""
    if isinstance(error, TimeoutError | ConnectionError | asyncio.TimeoutError):  # distinct before Python 3.11
        return True
    if isinstance(error, InferenceHTTPError):
        return error.transient
    return _is_transient_third_party(error)


def _is_transient_third_party(error: BaseException) -> bool:
    # Only libraries already imported can have raised the error: look them up without importing them.
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        if isinstance(error, httpx.HTTPStatusError):
            status = error.response.status_code
            return status in InferenceHTTPError.TRANSIENT_STATUSES or status >= 500
        if isinstance(error, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError):
            return True
    requests_exceptions = sys.modules.get("requests.exceptions")
    if requests_exceptions is not None:
        if isinstance(error, requests_exceptions.HTTPError) and error.response is not None:
            status = error.response.status_code
            return status in InferenceHTTPError.TRANSIENT_STATUSES or status >= 500
        if isinstance(error, requests_exceptions.Timeout | requests_exceptions.ConnectionError):
            return True
    return False


def backoff_delay(
    retry: int,
    *,
    backoff: float,
    backoff_max: float,
    jitter: float,
    rng: random.Random,
    error: BaseException | None = None,
) -> float:
    """Seconds to wait before retry number ``retry`` (1 for the first retry); see the module docstring."""
    if retry < 1:
        raise ValueError(f"expected retry >= 1, got {retry}")
    base = min(backoff_max, backoff * 2.0 ** (retry - 1))
    delay = base * (1.0 - jitter * rng.random())
    retry_after = getattr(error, "retry_after", None)
    if isinstance(retry_after, int | float) and retry_after > delay:
        delay = min(float(retry_after), backoff_max)
    return delay
