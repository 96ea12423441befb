"""Ahead-of-time build provider (entry point ``llamatelemetry.kernel_builds``: ``flashattn``).

``python -m llamatelemetry_core.aot --device t4 --device a100 --device h100`` compiles the FlashAttention kernel
with the tiles :func:`~llamatelemetry_flashattn.tiles.choose_tiles` picks on each device and checks them against
its limits (a T4 allows 64 KiB of shared memory per block).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = ["kernel_builds"]


def kernel_builds(device: DeviceInfo) -> Iterator[KernelBuild]:
    """The kernel builds the library launches on ``device`` (none when Triton is not installed)."""
    try:
        from llamatelemetry_flashattn import triton_kernel
    except ImportError:
        return
    yield from triton_kernel.kernel_builds(device)
