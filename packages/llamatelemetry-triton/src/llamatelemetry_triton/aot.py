"""The ahead-of-time build provider: every built-in kernel as this library would launch it on a device.

Registered under the ``llamatelemetry.kernel_builds`` entry point, so that ``python -m llamatelemetry_core.aot
--device t4 --device a100 --device h100`` compiles each kernel for that GPU's compute capability (no GPU needed)
and checks shared memory, threads and registers against its limits. The launch configurations come from the
same choosers the launchers call (:mod:`llamatelemetry_triton.heuristics`), for representative shapes: hidden
sizes 768, 4096, 8192 and 16384, a 128256-long softmax row, head dimensions 64 and 128; fp16 and fp32
everywhere, bf16 only on GPUs that support it. Builds whose kernel, types and configuration coincide are
yielded once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from llamatelemetry_triton._aot_shapes import HEAD_DIMS, HIDDEN_SIZES, VOCAB_SIZE
from llamatelemetry_triton.ops import add, argmax, glu, linear, norm, rope, rope_paged, softmax

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = ["HEAD_DIMS", "HIDDEN_SIZES", "VOCAB_SIZE", "kernel_builds"]

# each yields its own builds (aot_builds)
_OPERATION_MODULES = (add, norm, softmax, argmax, glu, rope, rope_paged, linear)


def _dtypes(device: DeviceInfo) -> list[torch.dtype]:
    return [torch.float16, torch.float32] + ([torch.bfloat16] if device.supports_bf16 else [])


def kernel_builds(device: DeviceInfo) -> Iterator[KernelBuild]:
    """Every built-in kernel with the configuration it gets on ``device`` (entry point for the AOT checks)."""
    seen: set[tuple[object, ...]] = set()
    for dtype in _dtypes(device):
        for module in _OPERATION_MODULES:
            for build in module.aot_builds(device, dtype):
                key = (
                    build.kernel,
                    tuple(sorted(build.signature.items())),
                    tuple(sorted(build.constexprs.items())),
                    build.num_warps,
                    build.num_stages,
                )
                if key not in seen:
                    seen.add(key)
                    yield build
