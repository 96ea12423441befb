"""The representative shapes and type names of the ahead-of-time builds (see :mod:`llamatelemetry_triton.aot`):
each operation's module yields its own builds for them, made with :func:`kernel_build`."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild

HIDDEN_SIZES = (768, 4096, 8192, 16384)
VOCAB_SIZE = 128256
HEAD_DIMS = (64, 128)
ROWS = 4096
TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def kernel_build(
    name: str,
    kernel: Any,
    types: Mapping[str, str],
    constexprs: Mapping[str, int | float | bool | str],
    *,
    num_warps: int,
    num_stages: int = 2,
) -> KernelBuild:
    """A :class:`~llamatelemetry_core.aot.KernelBuild` of ``kernel``: ``types[arg]`` for each runtime argument
    ``types`` names (pointers, say; names the kernel lacks are skipped, so that one mapping can serve several
    kernels), ``i32`` for the other runtime arguments, and ``constexprs`` for the constexpr ones."""
    from llamatelemetry_core.aot import KernelBuild, kernel_signature

    arguments = inspect.signature(getattr(kernel, "fn", kernel)).parameters
    own = {arg: t for arg, t in types.items() if arg in arguments}
    return KernelBuild(
        name, kernel, kernel_signature(kernel, own), constexprs, num_warps=num_warps, num_stages=num_stages
    )
