"""``BatchConfig``: how many calls run at once, the token budget, timeouts, retries, progress, token counting.

Every value is checked when the config is built; a bad one raises
:class:`~llamatelemetry_core.errors.ConfigurationError` naming the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from llamatelemetry_batch.retry import RetryPredicate, is_transient_error
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import check_positive_int

__all__ = ["CHARS_PER_TOKEN", "BatchConfig", "ProgressOption", "estimate_tokens"]

CHARS_PER_TOKEN = 4
"""Characters per token of the default estimate (BPE tokenizers on English prose average about four)."""

ProgressOption = bool | Literal["tqdm", "rich"]


def estimate_tokens(text: str) -> int:
    """Estimate the tokens of ``text`` without a tokenizer: ``ceil(len(text) / 4)``, at least 1.

    About four characters per token holds for English prose with the BPE tokenizers of GPT-, Llama- and
    Gemma-family models. Code, numbers and most non-Latin scripts need more tokens per character, so this
    underestimates them: pass ``BatchConfig(token_estimator=lambda s: len(tokenizer.encode(s)))`` there.
    """
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


@dataclass(frozen=True)
class BatchConfig:
    """How :class:`~llamatelemetry_batch.optimizer.BatchInferenceOptimizer` runs a list of prompts.

    Args:
        max_batch_size: the most prompts in flight at once: concurrent calls of a one-prompt function, or the
            prompts of one call of a :func:`~llamatelemetry_batch.functions.batched` function.
        max_tokens: the token budget of a batch: the estimated prompt tokens of the calls in flight (one-prompt
            function), or ``len(batch) * longest prompt`` of one batch (list function, which pads to its
            longest prompt). A prompt over the budget alone still runs, alone, with a warning.
        dynamic_batching: one-prompt functions: when the next prompt does not fit the token budget, a later
            one that fits starts first (without it, prompts start strictly in order). List functions: prompts
            are grouped by similar length (less padding) instead of being cut in order.
        timeout: seconds one call may take, or ``None`` for no limit. A call past it fails with
            :class:`~llamatelemetry_batch.errors.CallTimeoutError` (retried like any transient error).
        max_retries: further attempts of a call that failed with a transient error (0: never retry).
        retry_backoff: seconds before the first retry; doubled for each further one.
        retry_backoff_max: the longest wait between two attempts.
        retry_jitter: how much of each wait is random, in [0, 1]: the wait is scaled by ``uniform(1 - jitter, 1)``.
        retry_on: which errors are transient: a tuple of exception types, or ``predicate(error) -> bool``;
            ``None`` means :func:`~llamatelemetry_batch.retry.is_transient_error` (timeouts, connection errors,
            HTTP 408/409/425/429/5xx).
        stop_on_error: stop at the first prompt that fails for good: no call starts after it, calls in flight
            finish, and the error reports the prompts not run. A failed call of a list function is not split to
            find the prompt at fault then: each prompt of that batch is reported with the call's error.
            Otherwise every prompt runs, and the failures are reported together at the end.
        progress: show a progress bar over the prompts: ``True`` (tqdm if installed, else rich), ``"tqdm"``,
            ``"rich"``, or ``False``. Needs ``pip install "llamatelemetry-batch[progress]"`` (tqdm) or rich.
        token_estimator: ``estimator(prompt) -> tokens``, e.g. a tokenizer's length function; ``None`` means
            :func:`estimate_tokens` (about four characters per token).

    Raises:
        ConfigurationError: a value is out of range or of the wrong type; the message names the field.
    """

    max_batch_size: int = 8
    max_tokens: int = 2048
    dynamic_batching: bool = True
    timeout: float | None = None
    max_retries: int = 3
    retry_backoff: float = 0.5
    retry_backoff_max: float = 30.0
    retry_jitter: float = 0.5
    retry_on: tuple[type[BaseException], ...] | RetryPredicate | None = None
    stop_on_error: bool = False
    progress: ProgressOption = False
    token_estimator: Callable[[str], int] | None = None

    def __post_init__(self) -> None:
        check_positive_int(self.max_batch_size, "BatchConfig.max_batch_size")
        check_positive_int(self.max_tokens, "BatchConfig.max_tokens")
        _check_bool(self.dynamic_batching, "dynamic_batching")
        _check_bool(self.stop_on_error, "stop_on_error")
        if self.timeout is not None:
            _check_seconds(self.timeout, "timeout", allow_zero=False)
        _check_count(self.max_retries, "max_retries")
        _check_seconds(self.retry_backoff, "retry_backoff", allow_zero=True)
        _check_seconds(self.retry_backoff_max, "retry_backoff_max", allow_zero=True)
        if self.retry_backoff_max < self.retry_backoff:
            raise ConfigurationError(
                f"expected BatchConfig.retry_backoff_max >= retry_backoff ({self.retry_backoff}), "
                f"got {self.retry_backoff_max}"
            )
        _check_fraction(self.retry_jitter, "retry_jitter")
        self._check_retry_on()
        progress: object = self.progress
        if not isinstance(progress, bool) and progress not in ("tqdm", "rich"):
            raise ConfigurationError(
                f"expected BatchConfig.progress to be True, False, 'tqdm' or 'rich', got {self.progress!r}"
            )
        estimator: object = self.token_estimator
        if estimator is not None and not callable(estimator):
            raise ConfigurationError(
                "expected BatchConfig.token_estimator to be a callable prompt -> int (e.g. lambda s: "
                f"len(tokenizer.encode(s))), got {type(self.token_estimator).__name__}"
            )

    def _check_retry_on(self) -> None:
        value: object = self.retry_on
        if value is None or (callable(value) and not isinstance(value, type)):
            return
        if isinstance(value, tuple) and all(isinstance(t, type) and issubclass(t, BaseException) for t in value):
            return
        raise ConfigurationError(
            "expected BatchConfig.retry_on to be None, a tuple of exception types or a callable error -> bool, "
            f"got {value!r}; e.g. retry_on=(TimeoutError, ConnectionError)"
        )

    def is_retryable(self, error: BaseException) -> bool:
        """Whether ``error`` is transient under ``retry_on``."""
        if self.retry_on is None:
            return is_transient_error(error)
        if isinstance(self.retry_on, tuple):
            return isinstance(error, self.retry_on)
        return bool(self.retry_on(error))

    def count_tokens(self, prompt: str) -> int:
        """The estimated tokens of ``prompt`` (``token_estimator``, or :func:`estimate_tokens`)."""
        if self.token_estimator is None:
            return estimate_tokens(prompt)
        count: object = self.token_estimator(prompt)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigurationError(
                f"expected BatchConfig.token_estimator to return an integer >= 0, got {count!r} for a prompt of "
                f"{len(prompt)} characters"
            )
        return count


def _check_count(value: object, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"expected BatchConfig.{field} to be an integer >= 0, got {value!r}")


def _check_fraction(value: object, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigurationError(f"expected BatchConfig.{field} to be a number in [0, 1], got {value!r}")


def _check_bool(value: object, field: str) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(f"expected BatchConfig.{field} to be True or False, got {value!r}")


def _check_seconds(value: object, field: str, *, allow_zero: bool) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(
            f"expected BatchConfig.{field} to be a finite number of seconds {bound}, got {value!r}"
        )
