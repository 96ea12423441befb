"""Quantized K/V storage: symmetric, one float32 scale per token and head.

For a head vector ``x`` (``head_dim`` values) the scale is ``s = max|x| / qmax`` (``qmax`` = 127 for int8, 448
for float8 e4m3) and the stored value is ``q = round(x / s)`` (int8, clamped to [-127, 127]) or ``x / s``
rounded to the nearest e4m3 value; ``q * s`` stands for ``x`` (core's layout: :mod:`llamatelemetry_core.kv_layout`).
An all-zero vector gets ``s = 1``, so that no division by zero can arise. A vector holding NaN or an infinity
gets a NaN scale and reads back as NaN throughout (never as finite values that hide the bad input, whatever the
cast of its scaled values stored).
The largest error is half a step,
``s / 2`` per element for int8 (0.4% of the head's largest value); e4m3 keeps 3 mantissa bits (a relative error
of at most 1/16). These functions are the specification the Triton write kernel is tested against, and the CPU
path.
"""

from __future__ import annotations

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.kv_layout import QUANTIZED_KV_DTYPES
from llamatelemetry_core.validation import dtype_name

__all__ = ["dequantize_kv", "qmax_of", "quantize_kv"]

_FP8 = getattr(torch, "float8_e4m3fn", None)


def qmax_of(kv_dtype: torch.dtype) -> float:
    """The largest magnitude a quantized storage dtype represents after scaling (127 or 448)."""
    if kv_dtype == torch.int8:
        return 127.0
    if _FP8 is not None and kv_dtype == _FP8:
        return 448.0
    names = ", ".join(sorted(dtype_name(d) for d in QUANTIZED_KV_DTYPES))
    raise ConfigurationError(f"expected a quantized KV dtype in {{{names}}}, got {dtype_name(kv_dtype)}")


def quantize_kv(x: torch.Tensor, kv_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` ``[..., head_dim]`` to ``(q, scale)``: ``q`` as ``kv_dtype``, ``scale`` float32 ``[...]``.

    Pure tensor operations, no host synchronisation: safe inside CUDA graph capture.
    """
    qmax = qmax_of(kv_dtype)
    # A vector that is not finite (amax NaN or inf) gets a NaN scale: it reads back as NaN whatever its values were
    # cast to (casting NaN to int8 is undefined). Only an all-zero vector takes the scale 1 (``amax > 0`` would
    # send a NaN amax there too, and return rounded garbage). The Triton kernel computes the same.
    amax = x.detach().float().abs().amax(dim=-1)
    # Divided by a tensor, not a Python number: PyTorch's CUDA division by a scalar multiplies by its reciprocal,
    # which is not the correctly rounded quotient that the CPU (and the kernel's div_rn) compute.
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / torch.full_like(amax, qmax))
    scale = torch.where(amax.isfinite(), scale, torch.full_like(amax, float("nan")))
    scaled = x.float() / scale.unsqueeze(-1)
    if kv_dtype == torch.int8:
        q = scaled.round().clamp_(-qmax, qmax).to(torch.int8)
    else:
        q = scaled.clamp_(-qmax, qmax).to(kv_dtype)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` as ``dtype``: ``q`` ``[..., head_dim]`` quantized, ``scale`` float32 ``[...]``."""
    return (q.float() * scale.unsqueeze(-1)).to(dtype)
