"""The support checks every Triton implementation of an operation shares, and its registration, in one place.

A Triton kernel needs the package (a :func:`~llamatelemetry_core.callspec.requires_module` gate), a GPU of
compute capability 7.5 or newer, and Triton able to launch on the call's device (:func:`triton_runs`, probed once
per device); between those it checks what its own kernel supports. :func:`triton_checks` builds that list, in
that order, so that every operation reports the same reasons the same way; :func:`register_triton_kernel` registers an
implementation named ``triton`` with them, on the devices Triton runs on in this process::

    register_triton_kernel(OP, launch, kernel_dtypes(), bf16_on_device, my_head_dim_check, priority=350)

The checks run when an implementation is chosen (once per call key: dispatch remembers the choice), never on
the hot path of a call whose implementation is known.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from llamatelemetry_core.callspec import CallSpec, Check, requires_min_capability, requires_module
from llamatelemetry_core.device import get_device_info
from llamatelemetry_core.environment import triton_devices, triton_status
from llamatelemetry_core.selection import Implementation, Operation
from llamatelemetry_core.toolchain import TRITON_INSTALL
from llamatelemetry_core.validation import dtype_name

__all__ = [
    "CUDA_KERNEL_DTYPES",
    "INTERPRETER_DTYPES",
    "bf16_on_device",
    "kernel_dtypes",
    "register_triton_kernel",
    "triton_checks",
    "triton_runs",
]

CUDA_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
"""What the attention and cache kernels compute on a GPU."""

INTERPRETER_DTYPES = (torch.float16, torch.float32)
"""What Triton's interpreter (CPU tensors) computes correctly: it works in NumPy, which has no bfloat16, so its
bf16 results are garbage."""


@functools.cache
def _triton_unusable(index: int | None) -> str | None:
    """Why Triton cannot launch on CUDA device ``index`` (``None``: the CPU, in the interpreter); probed once."""
    device = get_device_info(torch.device("cuda", index) if index is not None else "cpu", refresh_memory=False)
    status = triton_status(device)
    return None if status.usable else status.reason


def triton_runs(call: CallSpec) -> str | None:
    """A check: Triton launches a probe kernel on the call's device (once per device; a simulated device is not
    probed, since nothing can run on it)."""
    if call.device.simulated:
        return None
    return _triton_unusable(call.device.index if call.device.is_cuda else None)


def bf16_on_device(call: CallSpec) -> str | None:
    """A check: a bfloat16 call on a GPU that has bf16 (a T4 has none; its reason advises fp16)."""
    if call.dtype == torch.bfloat16 and call.device.is_cuda and not call.device.supports_bf16:
        return f"{call.device.name} has no bf16 support ({call.device.architecture}); use fp16"
    return None


def kernel_dtypes(
    cuda: tuple[torch.dtype, ...] = CUDA_KERNEL_DTYPES,
    interpreter: tuple[torch.dtype, ...] = INTERPRETER_DTYPES,
    *,
    what: str = "dtypes",
) -> Check:
    """A check: the call's dtype is one the kernel computes on its device kind, ``cuda`` on a GPU and
    ``interpreter`` on CPU tensors. Its reason reads ``supports {what} {float16, bfloat16} on cuda, not float32``
    (``what`` names the tensor, ``"query dtypes"`` say)."""

    def check(call: CallSpec) -> str | None:
        allowed = cuda if call.device.is_cuda else interpreter
        if call.dtype is not None and call.dtype not in allowed:
            names = ", ".join(dtype_name(d) for d in allowed)
            return f"supports {what} {{{names}}} on {call.device.kind}, not {dtype_name(call.dtype)}"
        return None

    return check


def triton_checks(*checks: Check) -> list[Check]:
    """The checks of a Triton implementation, in the order their reasons are reported: the package (a gate:
    nothing else is asked without it), compute capability >= 7.5, ``checks`` (the kernel's own), and
    :func:`triton_runs`."""
    return [
        requires_module("triton", TRITON_INSTALL),
        requires_min_capability(7, 5),
        *checks,
        triton_runs,
    ]


def register_triton_kernel(
    op: Operation,
    fn: Callable[..., Any],
    *checks: Check,
    priority: int,
    traced: Callable[..., Any] | None = None,
) -> Implementation:
    """Register ``fn`` as ``op``'s ``triton`` implementation: on :func:`~.environment.triton_devices`, with
    :func:`triton_checks` around the kernel's own ``checks`` (``traced``: what ``torch.compile`` traces)."""
    return op.register(
        "triton", fn, priority=priority, devices=triton_devices, checks=triton_checks(*checks), traced=traced
    )
