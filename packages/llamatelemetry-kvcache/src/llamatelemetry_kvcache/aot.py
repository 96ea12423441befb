"""Ahead-of-time build provider (entry point ``llamatelemetry.kernel_builds``: ``kvcache``).

``python -m llamatelemetry_core.aot --device t4`` compiles the paged K/V write kernel for each storage dtype the
library writes on that device and checks it against the device's limits.
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
        from llamatelemetry_kvcache import write_kernel
    except ImportError:
        return
    yield from write_kernel.kernel_builds(device)
