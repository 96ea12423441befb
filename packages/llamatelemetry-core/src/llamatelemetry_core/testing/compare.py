"""Comparing a fast path with its reference: per-dtype tolerances and a failure message that shows where."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamatelemetry_core.validation import dtype_name, format_shape

__all__ = ["TOLERANCES", "Tolerance", "assert_close", "tolerance_for"]


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol * |expected|`` passes."""

    atol: float
    rtol: float

    def scaled(self, factor: float) -> Tolerance:
        return Tolerance(self.atol * factor, self.rtol * factor)


# One table for every package. fp16 keeps 11 significant bits (one ulp is ~1e-3 relative), bf16 keeps 8
# (~8e-3); kernels that reduce in a different order than PyTorch differ by a few ulps of the output.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-8),
    torch.float32: Tolerance(atol=1e-5, rtol=1.3e-5),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(atol=1.6e-2, rtol=1.6e-2),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    """The shared tolerance of ``dtype``; exact (zero) for integer and boolean dtypes."""
    if dtype in TOLERANCES:
        return TOLERANCES[dtype]
    if dtype.is_floating_point:
        raise KeyError(f"no tolerance for {dtype_name(dtype)}; add one to TOLERANCES")
    return Tolerance(0.0, 0.0)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    equal_nan: bool = False,
    name: str = "output",
    max_report: int = 8,
) -> None:
    """Assert ``actual`` matches ``expected`` within the tolerance of ``dtype`` (default: ``actual.dtype``).

    On failure the message gives the number of mismatches, the largest error with its index, and the first
    ``max_report`` mismatching elements as (index, got, expected). NaN never matches unless ``equal_nan``;
    infinities must match exactly.
    """
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{name}: expected shape {format_shape(expected.shape)}, got {format_shape(actual.shape)}")
    tol = tolerance_for(dtype if dtype is not None else actual.dtype)
    atol = tol.atol if atol is None else atol
    rtol = tol.rtol if rtol is None else rtol
    got = actual.detach().to("cpu", torch.float64)
    want = expected.detach().to("cpu", torch.float64)
    diff = (got - want).abs()
    bad = diff > atol + rtol * want.abs()
    got_nan, want_nan = got.isnan(), want.isnan()
    bad |= got_nan ^ want_nan if equal_nan else got_nan | want_nan
    inf = got.isinf() | want.isinf()
    bad |= inf & (got != want)
    bad &= ~(inf & (got == want))
    if not bool(bad.any()):
        return
    count = int(bad.sum())
    finite = diff.masked_fill(~bad | diff.isnan(), -1.0)
    worst = int(finite.argmax()) if bool((finite >= 0).any()) else int(bad.flatten().nonzero()[0])
    worst_index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), got.shape))
    lines = [
        f"{name}: {count} of {got.numel()} elements differ beyond atol={atol:g}, rtol={rtol:g} "
        f"({dtype_name(actual.dtype)} vs {dtype_name(expected.dtype)}, shape {format_shape(got.shape)})",
        f"  largest error at {list(worst_index)}: got {got.flatten()[worst].item()!r}, "
        f"expected {want.flatten()[worst].item()!r}",
        "  first mismatches (index: got vs expected):",
    ]
    for flat in bad.flatten().nonzero().flatten()[:max_report].tolist():
        index = [int(i) for i in torch.unravel_index(torch.tensor(flat), got.shape)]
        lines.append(f"    {index}: {got.flatten()[flat].item()!r} vs {want.flatten()[flat].item()!r}")
    raise AssertionError("\n".join(lines))
