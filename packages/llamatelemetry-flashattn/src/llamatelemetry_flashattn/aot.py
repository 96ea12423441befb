"""Ahead-of-time build provider (entry point ``llamatelemetry.kernel_builds``: ``flashattn``).

``python -m llamatelemetry_core.aot --device t4 --device a100 --device h100`` compiles every Triton kernel of
this package with the tiles its launcher picks on each device and checks them against that device's limits (a
T4 allows 64 KiB of shared memory per block). Each kernel module lists its own builds (``aot_builds(device,
dtype)``, next to its kernels and launcher); this module only loops over them, for fp16 everywhere and bf16
where the device supports it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = ["kernel_builds"]


def kernel_builds(device: DeviceInfo) -> Iterator[KernelBuild]:
    """The kernel builds the library launches on ``device`` (none when Triton is not installed)."""
    try:
        from llamatelemetry_flashattn import paged_kernel, paged_merge, triton_kernel
    except ImportError:
        return
    dtypes = [torch.float16, torch.bfloat16] if device.supports_bf16 else [torch.float16]
    for module in (triton_kernel, paged_kernel, paged_merge):
        for dtype in dtypes:
            yield from module.aot_builds(device, dtype)
