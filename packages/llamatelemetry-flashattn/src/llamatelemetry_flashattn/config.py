"""``FlashAttentionConfig``: the settings of an attention call, validated when built."""

from __future__ import annotations

import math
from dataclasses import dataclass

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import check_probability

__all__ = ["FlashAttentionConfig", "check_softcap", "check_softmax_scale", "check_window_size"]

SUPPORTED_VERSIONS = (2,)


def check_window_size(window_size: object, name: str = "window_size") -> tuple[int, int] | None:
    """``None`` or ``(left, right)`` with each side an int >= -1 (-1 = unbounded); ``(-1, -1)`` becomes ``None``."""
    if window_size is None:
        return None
    ok = (
        isinstance(window_size, tuple | list)
        and len(window_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s >= -1 for s in window_size)
    )
    if not ok:
        raise ConfigurationError(
            f"expected {name} to be None or (left, right) with ints >= -1 (-1 = unbounded, FlashAttention's "
            f"convention), got {window_size!r}"
        )
    assert isinstance(window_size, tuple | list)
    left, right = int(window_size[0]), int(window_size[1])
    return None if (left, right) == (-1, -1) else (left, right)


def check_softcap(softcap: object, name: str = "softcap") -> float | None:
    """``None`` (or 0: no cap) or a finite number > 0."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, int | float) or not math.isfinite(softcap) or softcap < 0:
        raise ConfigurationError(f"expected {name} to be None or a finite number >= 0 (0 = no cap), got {softcap!r}")
    return None if softcap == 0 else float(softcap)


def check_softmax_scale(scale: object, name: str = "softmax_scale") -> float | None:
    """``None`` (``1 / sqrt(head_dim)``) or a finite number > 0."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise ConfigurationError(f"expected {name} to be None (1/sqrt(head_dim)) or a finite number > 0, got {scale!r}")
    return float(scale)


@dataclass(frozen=True)
class FlashAttentionConfig:
    """How attention is computed.

    * ``version``: the FlashAttention algorithm generation; 2 is the one implemented (every backend computes the
      same exact function, so the number only documents intent).
    * ``causal``: each query sees keys up to its own position (bottom-right aligned when ``q_len != kv_len``).
    * ``dropout_p``: probability of dropping an attention weight, applied in training only.
    * ``softmax_scale``: logit scale; ``None`` means ``1 / sqrt(head_dim)``.
    * ``window_size``: ``(left, right)`` keys visible around each query, ``-1`` unbounded; ``None`` = full.
    * ``softcap``: logits become ``softcap * tanh(logits / softcap)``; ``None`` = no cap.
    * ``backend``: force one implementation (``"flash_attn"``, ``"sdpa_cudnn"``, ``"sdpa_flash"``,
      ``"triton"``, ``"sdpa_efficient"``, ``"sdpa_cpu"``, ``"reference"``); ``None`` lets llamatelemetry choose.
      A forced backend that cannot run a call raises ``BackendUnavailableError``.

    Raises :class:`~llamatelemetry_core.errors.ConfigurationError` (a ``ValueError``) for invalid values.
    """

    version: int = 2
    causal: bool = True
    dropout_p: float = 0.0
    softmax_scale: float | None = None
    window_size: tuple[int, int] | None = None
    softcap: float | None = None
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.version not in SUPPORTED_VERSIONS:
            raise ConfigurationError(
                f"expected version to be one of {SUPPORTED_VERSIONS} (the FlashAttention-2 algorithm), "
                f"got {self.version!r}"
            )
        if not isinstance(self.causal, bool):
            raise ConfigurationError(f"expected causal to be True or False, got {self.causal!r}")
        object.__setattr__(self, "dropout_p", check_probability(self.dropout_p, "dropout_p"))
        object.__setattr__(self, "softmax_scale", check_softmax_scale(self.softmax_scale))
        object.__setattr__(self, "window_size", check_window_size(self.window_size))
        object.__setattr__(self, "softcap", check_softcap(self.softcap))
        if self.backend is not None:
            from llamatelemetry_flashattn.backends import ATTENTION

            names = sorted(i.name for i in ATTENTION.implementations)
            if self.backend not in names:
                raise ConfigurationError(f"expected backend to be None or one of {names}, got {self.backend!r}")
