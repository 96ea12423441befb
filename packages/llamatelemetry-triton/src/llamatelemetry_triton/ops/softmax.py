"""Softmax along any dimension: ``y_i = exp(x_i - max(x)) / sum_j exp(x_j - max(x))``, in fp32.

The softmax dimension is moved last (a copy only when the rows are not contiguous), so each row is a run of
memory. Rows that fit in one block (up to 16384 elements) are read once, kept in registers, and written once.

Longer rows (vocabularies of 128k-256k logits) use the online softmax of Milakov & Gimelshein, "Online
normalizer calculation for softmax" (2018): one streaming pass keeps, per lane, a running maximum ``m`` and a
running sum ``d`` of ``exp(x - m)``, rescaling ``d`` by ``exp(m_old - m_new)`` whenever the maximum grows; the
lanes are combined at the end the same way. A row may be cut into several chunks, each handled by its own
program (so that 32 rows of 128256 logits still fill an H100's 132 SMs); a second kernel combines the chunks'
``(m, d)`` pairs and writes ``exp(x - m) / d``, re-reading ``x`` mostly from L2.

Backward: ``dx = y * (dy - sum(dy * y))`` per row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_triton._aot_shapes import HIDDEN_SIZES, ROWS, TYPE_NAMES, VOCAB_SIZE, kernel_build
from llamatelemetry_triton._bounds import rowwise
from llamatelemetry_triton._compat import tl, triton
from llamatelemetry_triton._dispatch import (
    TritonOperation,
    check_float_tensor,
    compute_dtype,
    cuda_in_triton_dtypes,
    described,
    device_info,
    needs_autograd,
    run_op,
    triton_errors,
)
from llamatelemetry_triton._launch import on_device, rows_of
from llamatelemetry_triton.heuristics import LaunchConfig, current_max_block_size, next_power_of_2, softmax_config
from llamatelemetry_triton.registry import BuiltinEntry, KernelConfig

if TYPE_CHECKING:
    from collections.abc import Iterator

    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = ["SoftmaxFunction", "softmax_reference", "triton_softmax"]


def softmax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax of ``x`` along ``dim``, computed in fp32 (fp64 for fp64 inputs) and returned in ``x``'s dtype."""
    return torch.softmax(x.to(compute_dtype(x)), dim).to(x.dtype)


# --- kernels ----------------------------------------------------------------------------------------------


@triton.jit  # type: ignore[untyped-decorator]
def _softmax_fwd_kernel(X, Y, stride_x, n_cols, BLOCK_SIZE: tl.constexpr):  # type: ignore[no-untyped-def]
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=-float("inf"))
    x = x.to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    y = e / tl.sum(e, axis=0)
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _combine(m, d):  # type: ignore[no-untyped-def]
    """The row's ``(max, sum of exp(x - max))`` from per-lane or per-chunk pairs ``(m, d)`` (``d`` relative to
    ``m``); a part that has seen nothing but -inf has ``d = 0``, and shifting by 0 there avoids ``inf - inf``."""
    m_row = tl.max(m, axis=0)
    d_row = tl.sum(d * tl.exp(m - tl.where(m_row == -float("inf"), 0.0, m_row)), axis=0)
    return m_row, d_row


@triton.jit  # type: ignore[untyped-decorator]
def _load_grad_and_output(DY, Y, start, n_cols, BLOCK_SIZE: tl.constexpr):  # type: ignore[no-untyped-def]
    """The block of columns from ``start`` (with its mask) and ``dy``, ``y`` there in fp32 (0 past the row)."""
    cols = start + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + cols, mask=mask, other=0.0).to(tl.float32)
    return cols, mask, dy, y


@triton.jit  # type: ignore[untyped-decorator]
def _softmax_partial_stats_kernel(  # type: ignore[no-untyped-def]
    X, M, D, stride_x, n_cols, chunk_size, splits, BLOCK_SIZE: tl.constexpr
):
    # Online (m, d) over one chunk of one row; lanes keep their own pair until the end.
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    X += row * stride_x
    start = split * chunk_size
    end = tl.minimum(start + chunk_size, n_cols)
    # Loops are `while`, not `range()`: Triton 3.6's interpreter cannot take runtime range() bounds under NumPy 2.4.
    m = tl.full([BLOCK_SIZE], -float("inf"), tl.float32)
    d = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    offset = start
    while offset < end:
        cols = offset + tl.arange(0, BLOCK_SIZE)
        x = tl.load(X + cols, mask=cols < end, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # A lane that has seen nothing but -inf keeps d = 0; shifting by 0 there avoids computing inf - inf.
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        d = d * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
        offset += BLOCK_SIZE
    m_row, d_row = _combine(m, d)
    tl.store(M + row * splits + split, m_row)
    tl.store(D + row * splits + split, d_row)


@triton.jit  # type: ignore[untyped-decorator]
def _softmax_normalize_kernel(  # type: ignore[no-untyped-def]
    X, Y, M, D, stride_x, n_cols, chunk_size, splits, SPLITS_BLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    parts = tl.arange(0, SPLITS_BLOCK)
    m_parts = tl.load(M + row * splits + parts, mask=parts < splits, other=-float("inf"))
    d_parts = tl.load(D + row * splits + parts, mask=parts < splits, other=0.0)
    m_row, d_row = _combine(m_parts, d_parts)
    inv = 1.0 / d_row
    X += row * stride_x
    Y += row * n_cols
    start = split * chunk_size
    end = tl.minimum(start + chunk_size, n_cols)
    offset = start
    while offset < end:
        cols = offset + tl.arange(0, BLOCK_SIZE)
        mask = cols < end
        x = tl.load(X + cols, mask=mask, other=-float("inf")).to(tl.float32)
        tl.store(Y + cols, (tl.exp(x - m_row) * inv).to(Y.dtype.element_ty), mask=mask)
        offset += BLOCK_SIZE


@triton.jit  # type: ignore[untyped-decorator]
def _softmax_bwd_kernel(  # type: ignore[no-untyped-def]
    DY, Y, DX, stride_dy, n_cols, SINGLE_BLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    DY += row * stride_dy
    Y += row * n_cols
    DX += row * n_cols
    if SINGLE_BLOCK:
        cols, mask, dy, y = _load_grad_and_output(DY, Y, 0, n_cols, BLOCK_SIZE)
        dot = tl.sum(dy * y, axis=0)
        tl.store(DX + cols, (y * (dy - dot)).to(DX.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        start = tl.program_id(0) * 0
        while start < n_cols:
            _, _, dy, y = _load_grad_and_output(DY, Y, start, n_cols, BLOCK_SIZE)
            acc += dy * y
            start += BLOCK_SIZE
        dot = tl.sum(acc, axis=0)
        start = tl.program_id(0) * 0
        while start < n_cols:
            cols, mask, dy, y = _load_grad_and_output(DY, Y, start, n_cols, BLOCK_SIZE)
            tl.store(DX + cols, (y * (dy - dot)).to(DX.dtype.element_ty), mask=mask)
            start += BLOCK_SIZE


# --- host launchers -------------------------------------------------------------------------------------------


def _launch_config(n_rows: int, like: torch.Tensor) -> LaunchConfig:
    """How the kernels are launched on ``n_rows`` rows of ``like``'s last dimension, dtype and device."""
    return softmax_config(
        n_rows, like.shape[-1], like.dtype, device_info(like.device), max_block=current_max_block_size()
    )


def _softmax_forward(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of ``x``; the result is contiguous."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return y
    x2, n_rows, stride_x = rows_of(x)
    n_cols = x.shape[-1]
    config = _launch_config(n_rows, x)
    with on_device(x):
        if config.single_block:
            _softmax_fwd_kernel[(n_rows,)](
                x2, y, stride_x, n_cols, BLOCK_SIZE=config.block_size, num_warps=config.num_warps, enable_fp_fusion=True
            )
            return y
        stats = torch.empty((2, n_rows, config.splits), dtype=torch.float32, device=x.device)
        grid = (n_rows, config.splits)
        _softmax_partial_stats_kernel[grid](
            x2,
            stats[0],
            stats[1],
            stride_x,
            n_cols,
            config.chunk_size,
            config.splits,
            BLOCK_SIZE=config.block_size,
            num_warps=config.num_warps,
            enable_fp_fusion=True,
            num_stages=config.num_stages,
        )
        _softmax_normalize_kernel[grid](
            x2,
            y,
            stats[0],
            stats[1],
            stride_x,
            n_cols,
            config.chunk_size,
            config.splits,
            SPLITS_BLOCK=next_power_of_2(config.splits),
            BLOCK_SIZE=config.block_size,
            num_warps=config.num_warps,
            enable_fp_fusion=True,
            num_stages=config.num_stages,
        )
    return y


def _softmax_backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dx = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    if y.numel() == 0:
        return dx
    dy2, n_rows, stride_dy = rows_of(dy)
    n_cols = dy.shape[-1]
    config = _launch_config(n_rows, y)
    with on_device(y):
        _softmax_bwd_kernel[(n_rows,)](
            dy2,
            y.contiguous(),
            dx,
            stride_dy,
            n_cols,
            SINGLE_BLOCK=config.single_block,
            BLOCK_SIZE=config.block_size,
            num_warps=config.num_warps,
            enable_fp_fusion=True,
            num_stages=config.num_stages,
        )
    return dx


@torch.library.custom_op("llamatelemetry::triton_softmax_fwd", mutates_args=())
def _softmax_fwd_op(x: torch.Tensor) -> torch.Tensor:
    return _softmax_forward(x)


@_softmax_fwd_op.register_fake
def _softmax_fwd_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("llamatelemetry::triton_softmax_bwd", mutates_args=())
def _softmax_bwd_op(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _softmax_backward(dy, y)


@_softmax_bwd_op.register_fake
def _softmax_bwd_fake(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.empty(y.shape, dtype=y.dtype, device=y.device)


class SoftmaxFunction(torch.autograd.Function):
    """Softmax over the last dimension with a Triton backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = run_op(torch.ops.llamatelemetry.triton_softmax_fwd, _softmax_forward, x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        dx: torch.Tensor = run_op(torch.ops.llamatelemetry.triton_softmax_bwd, _softmax_backward, dy, y)
        return dx


@triton_errors("softmax")
def _softmax_triton(x: torch.Tensor, dim: int) -> torch.Tensor:
    if x.dim() == 0:
        return _softmax_last_dim(x.reshape(1)).reshape(())
    if dim == -1 or dim == x.dim() - 1:
        return _softmax_last_dim(x)
    return _softmax_last_dim(x.movedim(dim, -1)).movedim(-1, dim)


def _softmax_last_dim(x: torch.Tensor) -> torch.Tensor:
    if needs_autograd(x):
        y: torch.Tensor = SoftmaxFunction.apply(x)  # type: ignore[no-untyped-call]
        return y
    out: torch.Tensor = run_op(torch.ops.llamatelemetry.triton_softmax_fwd, _softmax_forward, x)
    return out


SOFTMAX = TritonOperation(
    "triton.softmax",
    softmax_reference,
    _softmax_triton,
    describe=lambda x, dim: described(x),
    traceable=lambda x, dim: cuda_in_triton_dtypes(x),
    aliases=("softmax",),
)


def triton_softmax(x: torch.Tensor, dim: int = -1, *, backend: str | None = None) -> torch.Tensor:
    """Softmax of ``x`` along ``dim`` (any dimension, any strides; fp16/bf16/fp32 computed in fp32).

    The result has ``x``'s shape and dtype; differentiable. Rows of any length are handled (long ones with an
    online softmax). Raises :class:`ConfigurationError` for a ``dim`` out of range.
    """
    check_float_tensor(x, "x")
    ndim = max(x.dim(), 1)
    given: object = dim  # validated at run time whatever the annotation says
    if isinstance(given, bool) or not isinstance(given, int) or not -ndim <= given < ndim:
        raise ConfigurationError(
            f"expected dim to be an integer in [{-ndim}, {ndim - 1}] for x of {x.dim()} dimensions, got {dim!r}"
        )
    return SOFTMAX(x, dim, backend=backend)  # type: ignore[no-any-return]


# --- ahead-of-time builds ----------------------------------------------------------------------------------


def aot_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """Every build of this module's kernels as they would be launched on ``device`` in ``dtype``, for the
    representative shapes (the ahead-of-time checks, :mod:`llamatelemetry_triton.aot`)."""
    t = TYPE_NAMES[dtype]
    types = {**dict.fromkeys(("X", "Y", "DY", "DX"), f"*{t}"), "M": "*fp32", "D": "*fp32"}
    for rows, cols in [*((ROWS, h) for h in HIDDEN_SIZES), (32, VOCAB_SIZE)]:
        config = softmax_config(rows, cols, dtype, device)
        tag = f"{t},{rows}x{cols},BLOCK={config.block_size}"
        block = {"BLOCK_SIZE": config.block_size}
        split_tag = f"{tag},splits={config.splits}"
        if config.single_block:
            kernels = [("softmax_fwd", tag, _softmax_fwd_kernel, block)]
        else:
            splits_block = {"SPLITS_BLOCK": next_power_of_2(config.splits), **block}
            kernels = [
                ("softmax_partial_stats", split_tag, _softmax_partial_stats_kernel, block),
                ("softmax_normalize", split_tag, _softmax_normalize_kernel, splits_block),
            ]
        kernels.append(("softmax_bwd", tag, _softmax_bwd_kernel, {"SINGLE_BLOCK": config.single_block, **block}))
        for name, suffix, kernel, constexprs in kernels:
            yield kernel_build(
                f"triton.{name}[{suffix}]",
                kernel,
                types,
                constexprs,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )


# --- registry entries ---------------------------------------------------------------------------------------


def registry_entries() -> dict[str, BuiltinEntry]:
    """This module's kernels in the registry (``get_kernel(name)``): kernel, default launch config, bounds check."""
    config = KernelConfig("softmax", 1024, 4, 1, description="row softmax, a row per block; (X, Y, stride_x, n_cols)")
    return {"softmax": (_softmax_fwd_kernel, config, rowwise("softmax", (("X", "stride_x"),), ("Y",)))}
