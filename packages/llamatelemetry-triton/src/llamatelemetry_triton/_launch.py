"""Small host-side helpers the launchers share: row views and the device context of a launch.

They sit on every kernel's hot path, so each avoids work in the common case: a contiguous tensor is used as it
is (no reshape), and the current CUDA device is switched only when the tensor lives on another one.

Every launch passes ``enable_fp_fusion=True``: multiply-adds fused into FMAs, the default of every Triton
release up to 3.9, which announces that 3.10 turns it off. Saying it keeps the kernels' results and speed the
same whichever Triton runs them (and keeps Triton 3.9's warning about the coming change away from users).
"""

from __future__ import annotations

import contextlib

import torch

from llamatelemetry_core.interpreter import triton_launch_guard

__all__ = ["as_rows", "on_device", "rows_of"]

_NO_SWITCH = contextlib.nullcontext()


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


def rows_of(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``(tensor, rows, row_stride)`` for a kernel that reads ``t`` as rows of ``t.shape[-1]`` unit-stride elements.

    A contiguous ``t`` is returned as it is (its data pointer is all a kernel needs); anything else goes through
    :func:`as_rows`.
    """
    n = t.shape[-1] if t.dim() else 1
    if t.is_contiguous():
        return t, (t.numel() // n if n else 0), n
    rows = as_rows(t)
    return rows, rows.shape[0], rows.stride(0)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager[object]:
    """The context of a launch on ``t``'s device: its CUDA device made current (Triton launches on the current
    device), or, for a CPU tensor under ``TRITON_INTERPRET=1``, the interpreter's lock (the interpreter is not
    thread-safe; see :mod:`llamatelemetry_core.interpreter`).

    A no-op context when ``t`` is already on the current CUDA device (the common case, and a cheap check next
    to switching devices twice).
    """
    if t.is_cuda:
        if t.get_device() != torch.cuda.current_device():
            return torch.cuda.device(t.device)
        return _NO_SWITCH
    return triton_launch_guard(t.device)
