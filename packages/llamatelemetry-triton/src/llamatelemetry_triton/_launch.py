"""Small host-side helpers the launchers share: row views and the device context of a launch."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["as_rows", "on_device"]


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` viewed as ``[rows, t.shape[-1]]`` with unit stride along the row; copied only when no view exists.

    Leading dimensions of any strides (slices, expanded or transposed batch dimensions) are kept as a view when
    they collapse into one row stride; anything else is copied, so a kernel never misreads a layout.
    """
    n = t.shape[-1] if t.dim() else 1
    rows = t.reshape(-1, n)
    if n > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    return rows


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """Make ``t``'s CUDA device current for a launch (Triton launches on the current device)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
