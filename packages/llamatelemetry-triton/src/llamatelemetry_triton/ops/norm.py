"""LayerNorm and RMSNorm over the last dimension, optionally fused with the residual add before them.

For a row ``x`` of ``N`` elements, in fp32 whatever the input dtype::

    LayerNorm   y = (x - mean(x)) * rsqrt(var(x) + eps) * weight + bias      (biased variance)
    RMSNorm     y = x * rsqrt(mean(x^2) + eps) * weight
    fused       h = x + residual;  y = norm(h);  returns (y, h)               (h: the next residual)

``x`` may have any number of leading dimensions and any strides; ``weight`` and ``bias`` are optional vectors of
``N`` elements of any float dtype; ``y`` has ``x``'s dtype and ``h`` the promoted dtype of ``x`` and ``residual``.
The fused form reads ``x`` and ``residual`` once and writes ``h`` and ``y`` once, where the unfused PyTorch code
(Hugging Face's ``LlamaRMSNorm`` after an add) makes several fp32 round trips.

Forward: one program per row; a row that fits in one block stays in registers, a longer one is looped over
three times (sum, centered sum of squares, normalize; RMSNorm needs two). Backward: a fixed grid of programs,
each owning consecutive rows and accumulating its share of ``dweight``/``dbias`` in registers (a partial row per
program, summed afterwards), the scheme of Triton's fused LayerNorm tutorial and Liger-Kernel::

    xhat = (x - mean) * rstd,  g = dy * weight
    dx = rstd * (g - xhat * mean(g * xhat) - mean(g))       (RMSNorm: without the last term)
    dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import format_shape
from llamatelemetry_triton._aot_shapes import HIDDEN_SIZES, TYPE_NAMES
from llamatelemetry_triton._bounds import grid_rows, int_argument, require_elements, rowwise
from llamatelemetry_triton._compat import tl, triton
from llamatelemetry_triton._dispatch import (
    TRITON_DTYPES,
    TritonOperation,
    check_float_tensor,
    check_vector,
    compute_dtype,
    cuda_in_triton_dtypes,
    described,
    device_info,
    needs_autograd,
    triton_errors,
)
from llamatelemetry_triton._launch import on_device, rows_of
from llamatelemetry_triton.heuristics import current_max_block_size, norm_backward_programs, norm_config
from llamatelemetry_triton.registry import BuiltinEntry, KernelConfig

if TYPE_CHECKING:
    from collections.abc import Iterator

    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = [
    "aot_builds",
    "fused_add_layernorm_reference",
    "fused_add_rmsnorm_reference",
    "layernorm_reference",
    "registry_entries",
    "rmsnorm_reference",
    "triton_fused_add_layernorm",
    "triton_fused_add_rmsnorm",
    "triton_layernorm",
    "triton_rmsnorm",
]


# --- references: the specification, the fallback and the test oracle ---------------------------------------


def layernorm_reference(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm of the last dimension in fp32 (fp64 for fp64 inputs), returned in ``x``'s dtype."""
    xf = x.to(compute_dtype(x))
    mean = xf.mean(-1, keepdim=True)
    centered = xf - mean
    y = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of the last dimension in fp32 (fp64 for fp64 inputs), returned in ``x``'s dtype."""
    xf = x.to(compute_dtype(x))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


def fused_add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; returns ``(rmsnorm(h) in x's dtype, h)``."""
    h = x + residual
    return rmsnorm_reference(h, weight, eps).to(x.dtype), h


def fused_add_layernorm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; returns ``(layernorm(h) in x's dtype, h)``."""
    h = x + residual
    return layernorm_reference(h, weight, bias, eps).to(x.dtype), h


# --- kernels ----------------------------------------------------------------------------------------------


@triton.jit  # type: ignore[untyped-decorator]
def _add_residual(x, R, H, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr):  # type: ignore[no-untyped-def]
    """A block of the row to normalize, in fp32: x, or h = x + residual rounded to h's dtype (the sum the model
    stores), written to H when STORE_H."""
    if HAS_RESIDUAL:
        h = (x + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        if STORE_H:
            tl.store(H + cols, h, mask=mask)
        x = h.to(tl.float32)
    return x


@triton.jit  # type: ignore[untyped-decorator]
def _store_normalized(  # type: ignore[no-untyped-def]
    Y, W, B, cols, mask, xc, rstd, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, EVICTION: tl.constexpr
):
    """y = xc * rstd (* weight) (+ bias), stored in Y's dtype; weight and bias loaded with ``EVICTION``."""
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0, eviction_policy=EVICTION).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0, eviction_policy=EVICTION).to(tl.float32)
    tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit  # type: ignore[untyped-decorator]
def _norm_fwd_kernel(  # type: ignore[no-untyped-def]
    X,
    R,
    W,
    B,
    Y,
    H,
    Mean,
    Rstd,
    stride_x,
    stride_r,
    n_cols,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_STATS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * n_cols
    R += row * stride_r
    H += row * n_cols
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        # Without a bias, the weight is loaded before the reductions, so that its latency overlaps x's instead of
        # following their barriers (RMSNorm at 16384 x 8192 on an H100: 99.2% -> 99.8% of copy). Holding weight
        # and bias both across the reductions costs registers: LayerNorm there fell to 89.5%, so it loads them after.
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT and not HAS_BIAS:
            w = tl.load(W + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        x = _add_residual(x, R, H, cols, mask, HAS_RESIDUAL, True)
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=0) / n_cols
            xc = tl.where(mask, x - mean, 0.0)
            if STORE_STATS:
                tl.store(Mean + row, mean)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
        if STORE_STATS:
            tl.store(Rstd + row, rstd)
        if HAS_WEIGHT and not HAS_BIAS:
            y = xc * rstd * w
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        else:
            _store_normalized(Y, W, B, cols, mask, xc, rstd, HAS_WEIGHT, HAS_BIAS, "evict_last")
    else:
        # Loops are `while`, not `range()`: Triton 3.6's interpreter cannot take runtime range() bounds under NumPy 2.4.
        # Pass 1: sum (LayerNorm) or sum of squares (RMSNorm), writing h on the way.
        acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        start = tl.program_id(0) * 0
        while start < n_cols:
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            x = _add_residual(x, R, H, cols, mask, HAS_RESIDUAL, True)
            if IS_RMS:
                acc += x * x
            else:
                acc += x
            start += BLOCK_SIZE
        if IS_RMS:
            mean = 0.0
            var = tl.sum(acc, axis=0) / n_cols
        else:
            mean = tl.sum(acc, axis=0) / n_cols
            if STORE_STATS:
                tl.store(Mean + row, mean)
            # Pass 2: centered sum of squares (two passes, not E[x^2] - E[x]^2, which cancels badly).
            acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
            start = tl.program_id(0) * 0
            while start < n_cols:
                cols = start + tl.arange(0, BLOCK_SIZE)
                mask = cols < n_cols
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                x = _add_residual(x, R, H, cols, mask, HAS_RESIDUAL, False)
                xc = tl.where(mask, x - mean, 0.0)
                acc += xc * xc
                start += BLOCK_SIZE
            var = tl.sum(acc, axis=0) / n_cols
        rstd = tl.math.rsqrt(var + eps)
        if STORE_STATS:
            tl.store(Rstd + row, rstd)
        # Last pass: normalize and write.
        start = tl.program_id(0) * 0
        while start < n_cols:
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            x = _add_residual(x, R, H, cols, mask, HAS_RESIDUAL, False)
            _store_normalized(Y, W, B, cols, mask, x - mean, rstd, HAS_WEIGHT, HAS_BIAS, "")
            start += BLOCK_SIZE


@triton.jit  # type: ignore[untyped-decorator]
def _bwd_block(  # type: ignore[no-untyped-def]
    DY, X, W, r64, stride_dy, stride_x, cols, mask, mean, rstd, HAS_WEIGHT: tl.constexpr
):
    """(dy, xhat, g = dy * weight) of a block of row ``r64``, in fp32."""
    x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_WEIGHT else dy
    return dy, xhat, g


@triton.jit  # type: ignore[untyped-decorator]
def _norm_bwd_kernel(  # type: ignore[no-untyped-def]
    DY,
    X,
    W,
    Mean,
    Rstd,
    DRES,
    DX,
    DW,
    DB,
    stride_dy,
    stride_x,
    stride_dres,
    n_rows,
    n_cols,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DRES: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    DW += pid.to(tl.int64) * n_cols
    DB += pid.to(tl.int64) * n_cols
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        row = row_start
        while row < row_end:
            r64 = row.to(tl.int64)
            x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + row)
            xhat = x * rstd if IS_RMS else tl.where(mask, (x - tl.load(Mean + row)) * rstd, 0.0)
            if HAS_WEIGHT:  # the weight is held across rows
                g = dy * w
                dw_acc += dy * xhat
            else:
                g = dy
            if HAS_BIAS:
                db_acc += dy
            c1 = tl.sum(xhat * g, axis=0) / n_cols
            if IS_RMS:
                dx = (g - xhat * c1) * rstd
            else:
                c2 = tl.sum(g, axis=0) / n_cols
                dx = (g - (xhat * c1 + c2)) * rstd
            if HAS_DRES:
                dx += tl.load(DRES + r64 * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + r64 * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
            row += 1
        if HAS_WEIGHT:
            tl.store(DW + cols, dw_acc, mask=mask)
        if HAS_BIAS:
            tl.store(DB + cols, db_acc, mask=mask)
    else:
        # Rows longer than a block: two passes per row; the program's partial dW/dB row lives in global memory
        # (zeroed by the launcher, owned by this program alone).
        row = row_start
        while row < row_end:
            r64 = row.to(tl.int64)
            rstd = tl.load(Rstd + row)
            mean = 0.0 if IS_RMS else tl.load(Mean + row)
            acc1 = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
            acc2 = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
            start = tl.program_id(0) * 0
            while start < n_cols:
                cols = start + tl.arange(0, BLOCK_SIZE)
                mask = cols < n_cols
                dy, xhat, g = _bwd_block(DY, X, W, r64, stride_dy, stride_x, cols, mask, mean, rstd, HAS_WEIGHT)
                acc1 += xhat * g
                acc2 += g
                start += BLOCK_SIZE
            c1 = tl.sum(acc1, axis=0) / n_cols
            c2 = tl.sum(acc2, axis=0) / n_cols
            start = tl.program_id(0) * 0
            while start < n_cols:
                cols = start + tl.arange(0, BLOCK_SIZE)
                mask = cols < n_cols
                dy, xhat, g = _bwd_block(DY, X, W, r64, stride_dy, stride_x, cols, mask, mean, rstd, HAS_WEIGHT)
                if HAS_WEIGHT:
                    tl.store(DW + cols, tl.load(DW + cols, mask=mask, other=0.0) + dy * xhat, mask=mask)
                if HAS_BIAS:
                    tl.store(DB + cols, tl.load(DB + cols, mask=mask, other=0.0) + dy, mask=mask)
                dx = (g - xhat * c1) * rstd if IS_RMS else (g - (xhat * c1 + c2)) * rstd
                if HAS_DRES:
                    dx += tl.load(DRES + r64 * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + r64 * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
                start += BLOCK_SIZE
            row += 1


@triton.jit  # type: ignore[untyped-decorator]
def _sum_partials_kernel(  # type: ignore[no-untyped-def]
    DW_PART,
    DB_PART,
    DW,
    DB,
    n_parts,
    n_cols,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Column sums of the ``[n_parts, n_cols]`` fp32 partials, in a fixed order (deterministic), cast on store."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = tl.program_id(0) * 0
    while start < n_parts:
        parts = start + tl.arange(0, BLOCK_P)
        offsets = parts[:, None].to(tl.int64) * n_cols + cols[None, :]
        mask = (parts < n_parts)[:, None] & col_mask[None, :]
        if HAS_WEIGHT:
            dw += tl.sum(tl.load(DW_PART + offsets, mask=mask, other=0.0), axis=0)
        if HAS_BIAS:
            db += tl.sum(tl.load(DB_PART + offsets, mask=mask, other=0.0), axis=0)
        start += BLOCK_P
    if HAS_WEIGHT:
        tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB + cols, db.to(DB.dtype.element_ty), mask=col_mask)


# --- host launchers -------------------------------------------------------------------------------------------

_PARTIAL_BLOCK_P = 32
_PARTIAL_BLOCK_N = 64


def _forward_outputs(
    x: torch.Tensor, residual: torch.Tensor | None, is_rms: bool, store_stats: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Empty ``(y, h, mean, rstd)`` of a forward (``None`` where :func:`_norm_forward` says)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = None if residual is None else torch.empty(x.shape, dtype=torch.result_type(x, residual), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) if store_stats else None
    mean = None if is_rms or rstd is None else torch.empty_like(rstd)
    return y, h, mean, rstd


def _backward_outputs(
    x: torch.Tensor, weight: torch.Tensor | None, has_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Empty ``(dx, dweight, dbias)``: the parameter gradients in the weight's dtype, ``None`` where absent.

    dweight and dbias are separate tensors: outputs of a custom op may not alias each other, and each becomes a
    parameter's ``.grad``."""
    param_dtype = weight.dtype if weight is not None else x.dtype
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty(x.shape[-1], dtype=param_dtype, device=x.device) if weight is not None else None
    db = torch.empty(x.shape[-1], dtype=param_dtype, device=x.device) if has_bias else None
    return dx, dw, db


def _norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    store_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(y, h, mean, rstd)``: ``h`` is ``None`` without a residual; ``mean`` and ``rstd`` (per row, fp32, for the
    backward) are ``None`` unless ``store_stats``, and ``mean`` is ``None`` for RMSNorm, which has none."""
    n_cols = x.shape[-1]
    y, h, mean, rstd = _forward_outputs(x, residual, is_rms, store_stats)
    if x.numel() == 0:
        return y, h, mean, rstd
    x2, n_rows, stride_x = rows_of(x)
    r2, _, stride_r = rows_of(residual) if residual is not None else (x2, n_rows, stride_x)
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    config = norm_config(n_cols, x.dtype, device_info(x.device), max_block=current_max_block_size())
    with on_device(x):
        _norm_fwd_kernel[(n_rows,)](
            x2,
            r2,
            w,
            b,
            y,
            h if h is not None else y,
            mean if mean is not None else y,
            rstd if rstd is not None else y,
            stride_x,
            stride_r,
            n_cols,
            eps,
            IS_RMS=is_rms,
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            STORE_STATS=store_stats,
            SINGLE_BLOCK=config.single_block,
            BLOCK_SIZE=config.block_size,
            num_warps=config.num_warps,
            enable_fp_fusion=True,
            num_stages=config.num_stages,
        )
    return y, h, mean, rstd


def _norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    dres: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    is_rms: bool,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dweight, dbias)``; ``dweight``/``dbias`` are ``None`` without a weight / bias."""
    n_cols = x.shape[-1]
    dx, dw, db = _backward_outputs(x, weight, has_bias)
    n_params = (weight is not None) + has_bias  # their fp32 partials share one allocation (below)
    if x.numel() == 0:
        return dx, None if dw is None else dw.zero_(), None if db is None else db.zero_()
    x2, n_rows, stride_x = rows_of(x)
    dy2, _, stride_dy = rows_of(dy)
    dres2, _, stride_dres = rows_of(dres) if dres is not None else (dy2, n_rows, stride_dy)
    device = device_info(x.device)
    config = norm_config(n_cols, x.dtype, device, backward=True, max_block=current_max_block_size())
    programs = norm_backward_programs(n_rows, device)
    rows_per_program = -(-n_rows // programs)
    programs = -(-n_rows // rows_per_program)
    alloc = torch.empty if config.single_block else torch.zeros
    partials = alloc((n_params, programs, n_cols), dtype=torch.float32, device=x.device) if n_params else dx
    dw_partial = partials[0] if dw is not None else dx
    db_partial = partials[n_params - 1] if db is not None else dx
    with on_device(x):
        _norm_bwd_kernel[(programs,)](
            dy2,
            x2,
            weight.contiguous() if weight is not None else x2,
            mean if mean is not None else rstd,
            rstd,
            dres2,
            dx,
            dw_partial,
            db_partial,
            stride_dy,
            stride_x,
            stride_dres,
            n_rows,
            n_cols,
            rows_per_program,
            IS_RMS=is_rms,
            HAS_WEIGHT=dw is not None,
            HAS_BIAS=db is not None,
            HAS_DRES=dres is not None,
            SINGLE_BLOCK=config.single_block,
            BLOCK_SIZE=config.block_size,
            num_warps=config.num_warps,
            enable_fp_fusion=True,
            num_stages=config.num_stages,
        )
        if dw is not None or db is not None:
            _sum_partials_kernel[(triton.cdiv(n_cols, _PARTIAL_BLOCK_N),)](
                dw_partial,
                db_partial,
                dw if dw is not None else db,
                db if db is not None else dw,
                programs,
                n_cols,
                HAS_WEIGHT=dw is not None,
                HAS_BIAS=db is not None,
                BLOCK_P=_PARTIAL_BLOCK_P,
                BLOCK_N=_PARTIAL_BLOCK_N,
                num_warps=4,
                enable_fp_fusion=True,
            )
    return dx, dw, db


# --- custom ops (torch.compile, CUDA graphs) ------------------------------------------------------------------
# A custom op's outputs are tensors: absent ones travel as empty tensors.


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("llamatelemetry::triton_norm_fwd", mutates_args=())
def _norm_fwd_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, mean, rstd = _norm_forward(x, residual, weight, bias, eps, is_rms)
    assert rstd is not None
    return y, _or_empty(h, x), _or_empty(mean, rstd), rstd


@_norm_fwd_op.register_fake
def _norm_fwd_fake(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, mean, rstd = _forward_outputs(x, residual, is_rms, True)
    assert rstd is not None
    return y, _or_empty(h, x), _or_empty(mean, rstd), rstd


@torch.library.custom_op("llamatelemetry::triton_norm_bwd", mutates_args=())
def _norm_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    dres: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    is_rms: bool,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _norm_backward(dy, x, dres, weight, mean, rstd, is_rms, has_bias)
    return dx, _or_empty(dw, x), _or_empty(db, x)


@_norm_bwd_op.register_fake
def _norm_bwd_fake(
    dy: torch.Tensor,
    x: torch.Tensor,
    dres: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    is_rms: bool,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = _backward_outputs(x, weight, has_bias)
    return dx, _or_empty(dw, x), _or_empty(db, x)


def _forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    store_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The forward launch: the custom op while ``torch.compile`` traces (statistics always kept), direct otherwise."""
    if torch.compiler.is_compiling():
        y, h, mean, rstd = torch.ops.llamatelemetry.triton_norm_fwd(x, residual, weight, bias, eps, is_rms)
        return y, (h if residual is not None else None), (None if is_rms else mean), rstd
    return _norm_forward(x, residual, weight, bias, eps, is_rms, store_stats)


def _backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    dres: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    is_rms: bool,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    if torch.compiler.is_compiling():
        dx, dw, db = torch.ops.llamatelemetry.triton_norm_bwd(dy, x, dres, weight, mean, rstd, is_rms, has_bias)
        return dx, (dw if weight is not None else None), (db if has_bias else None)
    return _norm_backward(dy, x, dres, weight, mean, rstd, is_rms, has_bias)


# --- autograd ---------------------------------------------------------------------------------------------


class NormFunction(torch.autograd.Function):
    """LayerNorm or RMSNorm, with an optional residual added first; returns ``(y, h)`` (``h`` empty without one)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        is_rms: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, h, mean, rstd = _forward(x, residual, weight, bias, eps, is_rms, True)
        ctx.save_for_backward(h if h is not None else x, weight, mean, rstd)
        ctx.is_rms = is_rms
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        if h is None:
            h = x.new_empty(0)
            ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None, dh: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        normed, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(normed)
        dres = dh if ctx.residual_dtype is not None else None
        dx, dw, db = _backward(dy, normed, dres, weight, mean, rstd, ctx.is_rms, ctx.has_bias)
        dresidual = None if ctx.residual_dtype is None else dx.to(ctx.residual_dtype)
        return dx.to(ctx.x_dtype), dresidual, dw, db, None, None


# --- operations and public functions --------------------------------------------------------------------------


def _check_norm_args(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> None:
    check_float_tensor(x, "x")
    if x.dim() == 0:
        raise ConfigurationError("expected x with at least one dimension (the one normalized), got a 0-d tensor")
    n = x.shape[-1]
    if residual is not None:
        check_float_tensor(residual, "residual")
        if residual.shape != x.shape:
            raise ConfigurationError(
                f"expected residual of the shape of x, {format_shape(x.shape)}, got {format_shape(residual.shape)}"
            )
        if residual.device != x.device:
            raise ConfigurationError(f"expected residual on {x.device} like x, got {residual.device}")
    check_vector(weight, n, "weight", x)
    check_vector(bias, n, "bias", x)
    given: object = eps  # validated at run time whatever the annotation says
    if isinstance(given, bool) or not isinstance(given, int | float) or not given >= 0:
        raise ConfigurationError(f"expected eps to be a number >= 0, got {eps!r}")


def _norm_apply(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if needs_autograd(x, residual, weight, bias):
        y, h = NormFunction.apply(x, residual, weight, bias, float(eps), is_rms)  # type: ignore[no-untyped-call]
        return y, h
    y, h, _, _ = _forward(x, residual, weight, bias, float(eps), is_rms, False)
    return y, h


@triton_errors("layernorm")
def _layernorm_triton(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return _norm_apply(x, None, weight, bias, eps, False)[0]


@triton_errors("rmsnorm")
def _rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _norm_apply(x, None, weight, None, eps, True)[0]


@triton_errors("fused_add_rmsnorm")
def _fused_add_rmsnorm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = _norm_apply(x, residual, weight, None, eps, True)
    assert h is not None
    return y, h


@triton_errors("fused_add_layernorm")
def _fused_add_layernorm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = _norm_apply(x, residual, weight, bias, eps, False)
    assert h is not None
    return y, h


def _residual_dtype_reason(residual: torch.Tensor) -> str | None:
    if residual.dtype not in TRITON_DTYPES:
        return f"the residual's dtype {residual.dtype} is not one of float16, bfloat16, float32"
    return None


LAYERNORM = TritonOperation(
    "triton.layernorm",
    layernorm_reference,
    _layernorm_triton,
    describe=lambda x, weight, bias, eps: described(x, weight, bias),
    traceable=lambda x, *_: cuda_in_triton_dtypes(x),
    aliases=("layernorm",),
)
RMSNORM = TritonOperation(
    "triton.rmsnorm",
    rmsnorm_reference,
    _rmsnorm_triton,
    describe=lambda x, weight, eps: described(x, weight),
    traceable=lambda x, *_: cuda_in_triton_dtypes(x),
    aliases=("rmsnorm",),
)
FUSED_ADD_RMSNORM = TritonOperation(
    "triton.fused_add_rmsnorm",
    fused_add_rmsnorm_reference,
    _fused_add_rmsnorm_triton,
    describe=lambda x, residual, weight, eps: described(
        x, residual, weight, triton_unsupported=_residual_dtype_reason(residual)
    ),
    traceable=lambda x, residual, *_: cuda_in_triton_dtypes(x, residual),
    aliases=("fused_add_rmsnorm",),
)
FUSED_ADD_LAYERNORM = TritonOperation(
    "triton.fused_add_layernorm",
    fused_add_layernorm_reference,
    _fused_add_layernorm_triton,
    describe=lambda x, residual, weight, bias, eps: described(
        x, residual, weight, bias, triton_unsupported=_residual_dtype_reason(residual)
    ),
    traceable=lambda x, residual, *_: cuda_in_triton_dtypes(x, residual),
    aliases=("fused_add_layernorm",),
)


def triton_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` (``[..., N]``, fp16/bf16/fp32, any strides).

    ``weight`` and ``bias`` are optional ``[N]`` vectors; the result has ``x``'s dtype. Differentiable in ``x``,
    ``weight`` and ``bias``. Runs the fused Triton kernel where it can, the PyTorch reference otherwise
    (``backend="triton"`` or ``"reference"`` chooses). Raises :class:`ConfigurationError` for mismatched shapes.
    """
    _check_norm_args(x, None, weight, bias, eps)
    return LAYERNORM(x, weight, bias, eps, backend=backend)  # type: ignore[no-any-return]


def triton_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *, backend: str | None = None
) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (``[..., N]``): ``x * rsqrt(mean(x^2) + eps) * weight``.

    Computed in fp32, returned in ``x``'s dtype; differentiable in ``x`` and ``weight``.
    """
    _check_norm_args(x, None, weight, None, eps)
    return RMSNORM(x, weight, eps, backend=backend)  # type: ignore[no-any-return]


def triton_fused_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``, then RMSNorm of ``h``, in one pass; returns ``(normed, h)``.

    ``h`` (the promoted dtype of ``x`` and ``residual``) is the residual stream the next layer adds to;
    ``normed`` has ``x``'s dtype. Differentiable in ``x``, ``residual`` and ``weight``.
    """
    check_float_tensor(residual, "residual")  # required here: None is an error, not "no residual"
    _check_norm_args(x, residual, weight, None, eps)
    return FUSED_ADD_RMSNORM(x, residual, weight, eps, backend=backend)  # type: ignore[no-any-return]


def triton_fused_add_layernorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``, then LayerNorm of ``h``, in one pass; returns ``(normed, h)``."""
    check_float_tensor(residual, "residual")  # required here: None is an error, not "no residual"
    _check_norm_args(x, residual, weight, bias, eps)
    return FUSED_ADD_LAYERNORM(x, residual, weight, bias, eps, backend=backend)  # type: ignore[no-any-return]


# --- ahead-of-time builds ----------------------------------------------------------------------------------


# (is_rms, has_residual, has_weight, has_bias) of LayerNorm, RMSNorm and their fused residual forms
_AOT_VARIANTS = {
    "layernorm": (False, False, True, True),
    "rmsnorm": (True, False, True, False),
    "fused_add_rmsnorm": (True, True, True, False),
    "fused_add_layernorm": (False, True, True, True),
}


def aot_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """Every build of this module's kernels as they would be launched on ``device`` in ``dtype``, for the
    representative shapes (the ahead-of-time checks, :mod:`llamatelemetry_triton.aot`)."""
    from llamatelemetry_core.aot import KernelBuild

    t = TYPE_NAMES[dtype]
    for hidden in HIDDEN_SIZES:
        config = norm_config(hidden, dtype, device)
        backward = norm_config(hidden, dtype, device, backward=True)
        tag = f"{t},N={hidden},BLOCK={config.block_size},{'single' if config.single_block else 'looped'}"
        for name, (is_rms, residual, weight, bias) in _AOT_VARIANTS.items():
            signature = {
                **dict.fromkeys(("X", "R", "W", "B", "Y", "H"), f"*{t}"),
                "Mean": "*fp32",
                "Rstd": "*fp32",
                "stride_x": "i32",
                "stride_r": "i32",
                "n_cols": "i32",
                "eps": "fp32",
                **dict.fromkeys(
                    (
                        "IS_RMS",
                        "HAS_RESIDUAL",
                        "HAS_WEIGHT",
                        "HAS_BIAS",
                        "STORE_STATS",
                        "SINGLE_BLOCK",
                        "BLOCK_SIZE",
                    ),
                    "constexpr",
                ),
            }
            yield KernelBuild(
                f"triton.{name}_fwd[{tag}]",
                _norm_fwd_kernel,
                signature,
                {
                    "IS_RMS": is_rms,
                    "HAS_RESIDUAL": residual,
                    "HAS_WEIGHT": weight,
                    "HAS_BIAS": bias,
                    "STORE_STATS": False,
                    "SINGLE_BLOCK": config.single_block,
                    "BLOCK_SIZE": config.block_size,
                },
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
            signature = {
                **dict.fromkeys(("DY", "X", "W"), f"*{t}"),
                "Mean": "*fp32",
                "Rstd": "*fp32",
                "DRES": f"*{t}",
                "DX": f"*{t}",
                "DW": "*fp32",
                "DB": "*fp32",
                **dict.fromkeys(
                    ("stride_dy", "stride_x", "stride_dres", "n_rows", "n_cols", "rows_per_program"), "i32"
                ),
                **dict.fromkeys(
                    ("IS_RMS", "HAS_WEIGHT", "HAS_BIAS", "HAS_DRES", "SINGLE_BLOCK", "BLOCK_SIZE"), "constexpr"
                ),
            }
            yield KernelBuild(
                f"triton.{name}_bwd[{tag}]",
                _norm_bwd_kernel,
                signature,
                {
                    "IS_RMS": is_rms,
                    "HAS_WEIGHT": weight,
                    "HAS_BIAS": bias,
                    "HAS_DRES": residual,
                    "SINGLE_BLOCK": backward.single_block,
                    "BLOCK_SIZE": backward.block_size,
                },
                num_warps=backward.num_warps,
                num_stages=backward.num_stages,
            )


# --- registry entries ---------------------------------------------------------------------------------------


def _norm_bounds(args: Mapping[str, Any], grid: tuple[int, ...]) -> None:
    rows, n_cols = grid_rows(grid), int_argument(args, "n_cols", "norm")
    if rows == 0 or n_cols == 0:
        return
    rowwise("norm", (("X", "stride_x"),), ("Y",))(args, grid)
    if args.get("HAS_RESIDUAL"):
        rowwise("norm", (("R", "stride_r"),), ("H",))(args, grid)
    for flag, name in (("HAS_WEIGHT", "W"), ("HAS_BIAS", "B")):
        if args.get(flag):
            require_elements(args, name, n_cols, "norm", f"n_cols = {n_cols}")
    if args.get("STORE_STATS"):
        for name in ("Mean", "Rstd"):
            require_elements(args, name, rows, "norm", f"one value per row, {rows} rows")


def registry_entries() -> dict[str, BuiltinEntry]:
    """This module's kernels in the registry (``get_kernel(name)``): kernel, default launch config, bounds check."""
    doc = "(X, R, W, B, Y, H, Mean, Rstd, stride_x, stride_r, n_cols, eps, IS_RMS, HAS_RESIDUAL, ...)"
    variants = {
        "layernorm": ({"IS_RMS": False}, "LayerNorm"),
        "rmsnorm": ({"IS_RMS": True}, "RMSNorm"),
        "fused_add_layernorm": ({"IS_RMS": False, "HAS_RESIDUAL": True}, "residual add + LayerNorm"),
        "fused_add_rmsnorm": ({"IS_RMS": True, "HAS_RESIDUAL": True}, "residual add + RMSNorm"),
    }
    return {
        name: (_norm_fwd_kernel, KernelConfig(name, 1024, 4, 1, meta=meta, description=f"{what} {doc}"), _norm_bounds)
        for name, (meta, what) in variants.items()
    }
