"""BatchConfig validation, the token estimate, the retry classification and the backoff."""

from __future__ import annotations

import random
from typing import Any

import pytest

from llamatelemetry_batch import BatchConfig, CallTimeoutError, InferenceHTTPError, estimate_tokens, is_transient_error
from llamatelemetry_batch.retry import backoff_delay
from llamatelemetry_core.errors import ConfigurationError


def test_defaults_are_the_guides() -> None:
    config = BatchConfig(max_batch_size=8, max_tokens=2048, dynamic_batching=True)
    assert config == BatchConfig()
    assert config.timeout is None and config.max_retries == 3 and not config.stop_on_error


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_batch_size", 0),
        ("max_batch_size", 2.5),
        ("max_batch_size", True),
        ("max_tokens", -1),
        ("dynamic_batching", "yes"),
        ("timeout", 0),
        ("timeout", -1.0),
        ("timeout", float("inf")),
        ("max_retries", -1),
        ("max_retries", 1.0),
        ("retry_backoff", -0.1),
        ("retry_backoff_max", float("nan")),
        ("retry_jitter", 1.5),
        ("retry_on", ValueError),
        ("retry_on", (ValueError, "TimeoutError")),
        ("stop_on_error", 1),
        ("progress", "bars"),
        ("token_estimator", 4),
    ],
)
def test_invalid_values_raise_naming_the_field(field: str, value: Any) -> None:
    with pytest.raises(ConfigurationError, match=rf"BatchConfig\.{field}"):
        BatchConfig(**{field: value})


def test_backoff_max_must_not_be_below_backoff() -> None:
    with pytest.raises(ConfigurationError, match="retry_backoff_max >= retry_backoff"):
        BatchConfig(retry_backoff=2.0, retry_backoff_max=1.0)


def test_the_default_estimate_is_four_characters_per_token() -> None:
    assert estimate_tokens("") == 1
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("x" * 4000) == 1000
    assert BatchConfig().count_tokens("x" * 9) == 3
    assert BatchConfig(token_estimator=lambda s: len(s.split())).count_tokens("three short words") == 3


def test_a_token_estimator_must_return_a_count() -> None:
    config = BatchConfig(token_estimator=lambda s: 2.5)  # type: ignore[arg-type,return-value]
    with pytest.raises(ConfigurationError, match="return an integer"):
        config.count_tokens("x")


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (TimeoutError(), True),
        (CallTimeoutError("slow"), True),
        (ConnectionResetError(), True),
        (InferenceHTTPError(429, "", "u"), True),
        (InferenceHTTPError(503, "", "u"), True),
        (InferenceHTTPError(408, "", "u"), True),
        (InferenceHTTPError(400, "", "u"), False),
        (InferenceHTTPError(404, "", "u"), False),
        (ValueError("bad prompt"), False),
        (KeyError("x"), False),
    ],
)
def test_which_errors_are_transient(error: BaseException, transient: bool) -> None:
    assert is_transient_error(error) is transient
    assert BatchConfig().is_retryable(error) is transient


def test_httpx_errors_raised_by_a_users_function_are_classified() -> None:
    httpx = pytest.importorskip("httpx")
    request = httpx.Request("POST", "http://127.0.0.1/v1/completions")
    assert is_transient_error(httpx.ConnectError("refused", request=request))
    assert is_transient_error(httpx.ReadTimeout("slow", request=request))
    for status, transient in ((502, True), (429, True), (422, False)):
        response = httpx.Response(status, request=request)
        error = httpx.HTTPStatusError("status", request=request, response=response)
        assert is_transient_error(error) is transient


def test_retry_on_types_or_predicate() -> None:
    by_type = BatchConfig(retry_on=(KeyError,))
    assert by_type.is_retryable(KeyError()) and not by_type.is_retryable(TimeoutError())
    by_predicate = BatchConfig(retry_on=lambda e: "again" in str(e))
    assert by_predicate.is_retryable(ValueError("try again")) and not by_predicate.is_retryable(ValueError("no"))


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(0)
    plain = [backoff_delay(n, backoff=0.5, backoff_max=3.0, jitter=0.0, rng=rng) for n in range(1, 6)]
    assert plain == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = [backoff_delay(3, backoff=0.5, backoff_max=30.0, jitter=0.5, rng=rng) for _ in range(200)]
    assert all(1.0 <= d <= 2.0 for d in jittered)
    assert max(jittered) - min(jittered) > 0.5  # actually random, not a constant
    retry_after = InferenceHTTPError(503, "", "u", retry_after=2.5)
    assert backoff_delay(1, backoff=0.1, backoff_max=10.0, jitter=0.0, rng=rng, error=retry_after) == 2.5
    assert backoff_delay(1, backoff=0.1, backoff_max=1.0, jitter=0.0, rng=rng, error=retry_after) == 1.0
    with pytest.raises(ValueError, match="retry >= 1"):
        backoff_delay(0, backoff=0.1, backoff_max=1.0, jitter=0.0, rng=rng)
