"""Argument validation whose messages say what was expected, what was got, and what to do.

Every component validates its public inputs with these helpers so that the same mistake reads the same way
everywhere. Each helper returns nothing and raises :class:`~llamatelemetry_core.errors.ConfigurationError`
(a ``ValueError``) or ``TypeError`` where Python users expect one.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from llamatelemetry_core.errors import ConfigurationError

__all__ = [
    "check_dtype",
    "check_in",
    "check_ndim",
    "check_non_negative_int",
    "check_positive_int",
    "check_probability",
    "check_same_device",
    "check_shape",
    "check_tensor",
    "dtype_name",
    "format_shape",
]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def format_shape(shape: Sequence[int | str | None]) -> str:
    """Format a shape as ``[2, 16, 8, 64]``; ``None`` or a name stands for a dimension of any size."""
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def check_tensor(value: object, name: str) -> torch.Tensor:
    """Return ``value`` if it is a tensor; raise ``TypeError`` naming the parameter otherwise."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(value).__name__}")
    return value


def check_dtype(tensor: torch.Tensor, allowed: Collection[torch.dtype], name: str, *, hint: str = "") -> None:
    """Raise unless ``tensor.dtype`` is one of ``allowed``."""
    if tensor.dtype not in allowed:
        names = ", ".join(sorted(dtype_name(d) for d in allowed))
        fix = hint or f"convert it with {name}.to(torch.{dtype_name(next(iter(allowed)))})"
        raise ConfigurationError(f"expected {name} with dtype in {{{names}}}, got {dtype_name(tensor.dtype)}; {fix}")


def check_ndim(tensor: torch.Tensor, ndim: int | Collection[int], name: str, *, layout: str = "") -> None:
    """Raise unless ``tensor`` has ``ndim`` dimensions (or one of several counts)."""
    allowed = {ndim} if isinstance(ndim, int) else set(ndim)
    if tensor.dim() not in allowed:
        want = " or ".join(str(n) for n in sorted(allowed))
        what = f" ({layout})" if layout else ""
        raise ConfigurationError(
            f"expected {name} with {want} dimensions{what}, got shape {format_shape(tensor.shape)}"
        )


def check_shape(tensor: torch.Tensor, expected: Sequence[int | None], name: str, *, layout: str = "") -> None:
    """Raise unless ``tensor.shape`` matches ``expected``, where ``None`` matches any size."""
    shape = tuple(tensor.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape, strict=True))
    if not ok:
        what = f" {layout}" if layout else ""
        raise ConfigurationError(f"expected {name} of shape{what} {format_shape(expected)}, got {format_shape(shape)}")


def check_same_device(tensors: dict[str, torch.Tensor]) -> torch.device:
    """Raise unless all tensors live on one device; return that device."""
    devices = {name: t.device for name, t in tensors.items()}
    distinct = set(devices.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ConfigurationError(f"expected all tensors on one device, got {listing}; move them with .to(device) first")
    return next(iter(distinct))


def check_positive_int(value: object, name: str) -> int:
    """Return ``value`` if it is an int > 0 (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(f"expected {name} to be a positive integer, got {value!r}")
    return value


def check_non_negative_int(value: object, name: str) -> int:
    """Return ``value`` if it is an int >= 0 (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"expected {name} to be an integer >= 0, got {value!r}")
    return value


def check_probability(value: object, name: str) -> float:
    """Return ``value`` as a float if it is a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) < 1.0:
        raise ConfigurationError(f"expected {name} to be a number in [0, 1), got {value!r}")
    return float(value)


def check_in(value: object, allowed: Collection[object], name: str) -> None:
    """Raise unless ``value`` is one of ``allowed`` (a tensor never is: its ``==`` is elementwise)."""
    if isinstance(value, torch.Tensor) or value not in allowed:
        listing = ", ".join(repr(a) for a in allowed)
        raise ConfigurationError(f"expected {name} to be one of {listing}, got {value!r}")
