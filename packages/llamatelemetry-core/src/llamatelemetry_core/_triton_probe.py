"""A minimal Triton kernel that proves Triton can compile and launch on a device (used by ``doctor``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

_PROBE_BLOCK = 64


@triton.jit  # type: ignore[untyped-decorator]
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2.0, mask=mask)


def run_probe(device: torch.device) -> None:
    """Run the probe on ``device`` and check its result; raise on any failure."""
    x = torch.arange(37, dtype=torch.float32, device=device)
    y = torch.full_like(x, float("nan"))
    _scale_kernel[(1,)](x, y, x.numel(), BLOCK=_PROBE_BLOCK, enable_fp_fusion=True)
    if not torch.equal(y.cpu(), x.cpu() * 2):
        raise RuntimeError("the probe kernel ran but wrote wrong values")


def kernel_builds(device: DeviceInfo) -> Iterator[KernelBuild]:
    """The probe as ``doctor`` launches it, for ahead-of-time checks (entry point ``llamatelemetry.kernel_builds``)."""
    from llamatelemetry_core.aot import KernelBuild

    yield KernelBuild(
        "core.doctor_probe[fp32]",
        _scale_kernel,
        {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
        {"BLOCK": _PROBE_BLOCK},
        num_warps=4,
        num_stages=2,
    )
