"""A minimal Triton kernel that proves Triton can compile and launch on a device (used by ``doctor``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit  # type: ignore[untyped-decorator]
def _scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) * 2.0, mask=mask)


def run_probe(device: torch.device) -> None:
    """Run the probe on ``device`` and check its result; raise on any failure."""
    x = torch.arange(37, dtype=torch.float32, device=device)
    y = torch.full_like(x, float("nan"))
    _scale_kernel[(1,)](x, y, x.numel(), BLOCK=64)
    if not torch.equal(y.cpu(), x.cpu() * 2):
        raise RuntimeError("the probe kernel ran but wrote wrong values")
