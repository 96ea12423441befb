"""Every test leaves PyTorch's process-wide switches as it found them; the matmul error bound; a counter of the
fused path's kernel launches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from llamatelemetry_tensorcore._flags import restore_flags, snapshot_flags


@pytest.fixture(autouse=True)
def _restore_backend_flags() -> Iterator[None]:
    before = snapshot_flags()
    yield
    restore_flags(before)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def check_low_precision_matmul(
    result: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, *, splits: int = 4
) -> None:
    """Assert ``result`` is ``a @ b`` computed from inputs rounded to ``dtype`` with fp32 sums.

    Elementwise, the rounding of both inputs, ``splits`` partial sums rounded to ``dtype`` (cuBLAS split-K with
    reduced-precision reduction) and the rounding of the result bound the error by
    ``(2 + splits) u (|a| @ |b|) + u_out |a @ b|``; normwise, the error must stay within a few ``u``.
    """
    ref = torch.matmul(a.double().cpu(), b.double().cpu())
    magnitude = torch.matmul(a.double().cpu().abs(), b.double().cpu().abs())
    u = _unit_roundoff(dtype)
    u_out = max(u, _unit_roundoff(result.dtype))
    got = result.detach().double().cpu()
    assert tuple(got.shape) == tuple(ref.shape), f"expected shape {tuple(ref.shape)}, got {tuple(got.shape)}"
    err = (got - ref).abs()
    bound = (2 + splits) * u * magnitude + u_out * ref.abs() + 1e-30
    bad = ~(err <= bound)
    if bool(bad.any()):
        idx = [int(i) for i in torch.unravel_index(bad.flatten().nonzero()[0][0], bad.shape)]
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} elements beyond the {dtype} error bound; first at {idx}: "
            f"got {got[tuple(idx)].item()!r}, expected {ref[tuple(idx)].item()!r} +- {bound[tuple(idx)].item():.3g}"
        )
    if ref.numel():
        relative = float((got - ref).norm() / ref.norm().clamp_min(1e-300))
        assert relative <= 4 * u_out, f"normwise relative error {relative:.3g} above 4u = {4 * u_out:.3g}"


@pytest.fixture
def check_matmul() -> Callable[..., None]:
    return check_low_precision_matmul


class KernelLaunches:
    """Counts the launches of one kernel of ``llamatelemetry_tensorcore._fused_kernels`` (and still launches it):
    ``grids`` holds the grid of each launch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        from llamatelemetry_tensorcore import _fused_kernels

        self.kernel, self.grids = getattr(_fused_kernels, name), list[object]()
        monkeypatch.setattr(_fused_kernels, name, self)

    def __getitem__(self, grid: object) -> Any:
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture
def kernel_launches(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], KernelLaunches]:
    """``kernel_launches("split_sum_kernel")`` starts counting that kernel's launches for the test."""
    return lambda name: KernelLaunches(monkeypatch, name)
