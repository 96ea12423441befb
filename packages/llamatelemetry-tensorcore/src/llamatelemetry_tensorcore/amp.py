"""``enable_amp``: a gradient scaler and a reusable autocast context for mixed-precision training.

Built on :mod:`torch.amp` (not the deprecated ``torch.cuda.amp``). fp16 needs loss scaling (small gradients
underflow fp16), bf16 does not (it has fp32's range), so the :class:`torch.amp.GradScaler` is enabled for fp16
on a GPU only; disabled, its ``scale``, ``step`` and ``update`` are plain pass-throughs, so the same training
loop runs everywhere. Without a GPU, autocast runs on the CPU in bf16.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast

import torch

from llamatelemetry_core.device import DeviceInfo
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import dtype_name
from llamatelemetry_tensorcore._device import runtime_device
from llamatelemetry_tensorcore.config import TensorCoreWarning, resolve_compute_dtype

__all__ = ["AmpPlan", "ReusableAutocast", "enable_amp", "plan_amp"]

_F = TypeVar("_F", bound=Callable[..., Any])


class ReusableAutocast:
    """An autocast context that can be entered any number of times, nested or in sequence, from any thread.

    Each ``with`` creates a fresh :class:`torch.autocast` (a single ``torch.autocast`` object is not reusable
    across nested or repeated ``with`` blocks in every torch version). Also usable as a decorator.
    """

    def __init__(
        self, device_type: str, dtype: torch.dtype, *, enabled: bool = True, cache_enabled: bool | None = None
    ) -> None:
        self.device_type = device_type
        self.dtype = dtype
        self.enabled = enabled
        self.cache_enabled = cache_enabled
        self._local = threading.local()

    def _stack(self) -> list[torch.autocast]:
        stack: list[torch.autocast] | None = getattr(self._local, "stack", None)
        if stack is None:
            stack = []
            self._local.stack = stack
        return stack

    def __enter__(self) -> ReusableAutocast:
        context = torch.autocast(
            self.device_type, dtype=self.dtype, enabled=self.enabled, cache_enabled=self.cache_enabled
        )
        context.__enter__()  # type: ignore[no-untyped-call]
        self._stack().append(context)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack = self._stack()
        if not stack:
            raise ConfigurationError(
                "ReusableAutocast.__exit__ called without a matching __enter__ in this thread; use it as "
                "`with autocast:` (or as a decorator) rather than calling __exit__ directly"
            )
        stack.pop().__exit__(exc_type, exc, tb)

    def __call__(self, fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return cast(_F, wrapper)

    def __repr__(self) -> str:
        return f"ReusableAutocast({self.device_type!r}, dtype=torch.{dtype_name(self.dtype)}, enabled={self.enabled})"


@dataclass(frozen=True)
class AmpPlan:
    """What :func:`enable_amp` builds on one device."""

    device_type: str
    dtype: torch.dtype
    scaler_enabled: bool
    warning: str | None = None


def plan_amp(info: DeviceInfo, dtype: torch.dtype = torch.float16, *, strict: bool = False) -> AmpPlan:
    """The autocast dtype and scaler state for ``info`` (pure; warns for bf16 on a T4-class GPU)."""
    if not info.is_cuda:
        compute = resolve_compute_dtype(info, dtype)
        warning = None
        if compute != torch.bfloat16:
            warning = f"no CUDA device: autocast runs on the CPU in bfloat16 (asked for {dtype_name(dtype)})"
        return AmpPlan("cpu", torch.bfloat16, False, warning)
    compute = resolve_compute_dtype(info, dtype, strict=strict)
    warning = None
    if not info.has_tensor_cores:
        warning = f"{info.name} has no Tensor Cores: autocast still runs in {dtype_name(compute)}, without their speed"
    return AmpPlan("cuda", compute, compute == torch.float16, warning)


def enable_amp(
    dtype: torch.dtype = torch.float16,
    *,
    device: int | str | torch.device | None = None,
    strict: bool = False,
    init_scale: float = 2.0**16,
    growth_interval: int = 2000,
) -> tuple[torch.amp.GradScaler, ReusableAutocast]:
    """``(scaler, autocast)`` for mixed-precision training on ``device`` (default: the current GPU, else CPU).

    ``autocast`` is a :class:`ReusableAutocast` to enter once per step; ``scaler`` a real
    :class:`torch.amp.GradScaler`, enabled for fp16 on a GPU (``init_scale`` and ``growth_interval`` are
    passed to it) and disabled for bf16 and on the CPU. bf16 on a GPU without it (T4) warns and uses fp16
    (``strict=True`` raises :class:`~llamatelemetry_core.errors.CapabilityError`); without a GPU autocast runs
    in bf16 on the CPU, with a :class:`~llamatelemetry_tensorcore.config.TensorCoreWarning` when fp16 was asked.
    """
    _, info = runtime_device(device)
    plan = plan_amp(info, dtype, strict=strict)
    if plan.warning is not None:
        warnings.warn(plan.warning, TensorCoreWarning, stacklevel=2)
    scaler = torch.amp.GradScaler(
        plan.device_type, init_scale=init_scale, growth_interval=growth_interval, enabled=plan.scaler_enabled
    )
    return scaler, ReusableAutocast(plan.device_type, plan.dtype)
