"""The backward of :mod:`llamatelemetry_triton.ops.norm` (LayerNorm and RMSNorm, with or without the residual add):
its kernels, launcher, custom op and ahead-of-time builds. The forward, autograd function and public functions
are in ``norm.py``, which calls :func:`norm_backward`.

A fixed grid of programs, each owning consecutive rows and accumulating its share of ``dweight``/``dbias`` in
registers (a partial row per program, summed afterwards in a fixed order), the scheme of Triton's fused LayerNorm
tutorial and Liger-Kernel::

    xhat = (x - mean) * rstd,  g = dy * weight
    dx = rstd * (g - xhat * mean(g * xhat) - mean(g))       (RMSNorm: without the last term)
    dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)

A row is taken in one of three ways (:func:`~llamatelemetry_triton.heuristics.norm_config` chooses): held (the
row, the weight and the accumulators in registers, one read: up to 8192 elements, and RMSNorm's 2-byte rows of up
to 16384, which spill a little but were timed faster than the next way); read twice (LayerNorm's 2-byte rows of
8193-16384 elements: only the accumulators stay, the row's two sums come from a first read in blocks and dx from
a second read of the whole row, served by L1/L2); or looped (longer rows, and fp32 past 8192: two passes in
blocks, the program's partial dweight/dbias row in global memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llamatelemetry_triton._aot_shapes import TYPE_NAMES
from llamatelemetry_triton._compat import tl, triton
from llamatelemetry_triton._dispatch import device_info
from llamatelemetry_triton._launch import on_device, rows_of
from llamatelemetry_triton.heuristics import (
    NORM_BWD_SUM_BLOCK,
    LaunchConfig,
    current_max_block_size,
    norm_backward_programs,
    norm_config,
)

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = ["backward_build", "build_name", "norm_backward"]


# --- kernels ----------------------------------------------------------------------------------------------


@triton.jit  # type: ignore[untyped-decorator]
def _bwd_block(  # type: ignore[no-untyped-def]
    DY, X, W, r64, stride_dy, stride_x, cols, mask, mean, rstd, HAS_WEIGHT: tl.constexpr
):
    """(dy, xhat, g = dy * weight) of a block of row ``r64``, in fp32 (``xhat`` zero outside the row)."""
    x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) if HAS_WEIGHT else dy
    return dy, xhat, g


@triton.jit  # type: ignore[untyped-decorator]
def _add_pair(a1: tl.tensor, a2: tl.tensor, b1: tl.tensor, b2: tl.tensor):  # type: ignore[no-untyped-def]
    """Combines two pairs of partial sums (the ``tl.reduce`` of :func:`_row_sums`)."""
    return a1 + b1, a2 + b2


@triton.jit  # type: ignore[untyped-decorator]
def _row_sums(  # type: ignore[no-untyped-def]
    DY,
    X,
    W,
    r64,
    stride_dy,
    stride_x,
    n_cols,
    mean,
    rstd,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROLLED: tl.constexpr,
):
    """``(mean(xhat * g), mean(g))`` of row ``r64``, read in blocks of ``BLOCK``: ``UNROLLED`` blocks unrolled at
    compile time (their loads may then be in flight together), or as many as the row needs in a loop (0)."""
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    if UNROLLED:
        for i in tl.static_range(UNROLLED):
            cols = i * BLOCK + tl.arange(0, BLOCK)
            mask = cols < n_cols
            _, xhat, g = _bwd_block(DY, X, W, r64, stride_dy, stride_x, cols, mask, mean, rstd, HAS_WEIGHT)
            acc1 += xhat * g
            acc2 += g
    else:
        # `while`, not `range()`: Triton 3.6's interpreter cannot take runtime range() bounds under NumPy 2.4.
        start = tl.program_id(0) * 0
        while start < n_cols:
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            _, xhat, g = _bwd_block(DY, X, W, r64, stride_dy, stride_x, cols, mask, mean, rstd, HAS_WEIGHT)
            acc1 += xhat * g
            acc2 += g
            start += BLOCK
    sum1, sum2 = tl.reduce((acc1, acc2), 0, _add_pair)  # one reduction for both: one round of barriers
    return sum1 / n_cols, sum2 / n_cols


@triton.jit  # type: ignore[untyped-decorator]
def _store_dx(  # type: ignore[no-untyped-def]
    DY,
    X,
    W,
    DRES,
    DX,
    r64,
    stride_dy,
    stride_x,
    stride_dres,
    n_cols,
    cols,
    mean,
    rstd,
    c1,
    c2,
    dw,
    db,
    IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_DRES: tl.constexpr,
):
    """Writes ``dx`` of a block of row ``r64`` from the row's two sums; returns ``(dw + dy * xhat, db + dy)``, the
    block's share of ``dweight`` and ``dbias`` added (nothing outside the row, where ``dy`` loads as 0)."""
    mask = cols < n_cols
    x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = (x - mean) * rstd
    # Accumulated before dx is stored: dy and xhat then die early, which matters at 16384-element blocks.
    if HAS_WEIGHT:
        dw += dy * xhat
        g = dy * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        g = dy
    if HAS_BIAS:
        db += dy
    # dx = rstd * (g - xhat * c1 - c2), written as fused multiply-adds on xhat and g
    dx = g * rstd - xhat * (c1 * rstd) if IS_RMS else g * rstd - (xhat * (c1 * rstd) + c2 * rstd)
    if HAS_DRES:
        dx += tl.load(DRES + r64 * stride_dres + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + r64 * n_cols + cols, dx.to(DX.dtype.element_ty), mask=mask)
    return dw, db


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
    REREAD_ROW: tl.constexpr,
    SUM_BLOCK: tl.constexpr,
    UNROLLED: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    DW += pid.to(tl.int64) * n_cols
    DB += pid.to(tl.int64) * n_cols
    if SINGLE_BLOCK and not REREAD_ROW:
        # The row stays in registers from its one read to dx; the weight is held across rows.
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
            if HAS_WEIGHT:
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
    elif SINGLE_BLOCK:
        # REREAD_ROW: only the dweight/dbias accumulators stay in registers across rows. Each row is read twice,
        # in blocks of SUM_BLOCK for its two sums (UNROLLED of them, or a loop), then whole for dx (from L1/L2):
        # holding the row and the weight as well spills at 16384 elements.
        cols = tl.arange(0, BLOCK_SIZE)
        dw_acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        row = row_start
        while row < row_end:
            r64 = row.to(tl.int64)
            rstd = tl.load(Rstd + row)
            mean = 0.0 if IS_RMS else tl.load(Mean + row)
            c1, c2 = _row_sums(DY, X, W, r64, stride_dy, stride_x, n_cols, mean, rstd, HAS_WEIGHT, SUM_BLOCK, UNROLLED)
            dw_acc, db_acc = _store_dx(
                DY, X, W, DRES, DX, r64, stride_dy, stride_x, stride_dres, n_cols, cols, mean, rstd, c1, c2,
                dw_acc, db_acc, IS_RMS, HAS_WEIGHT, HAS_BIAS, HAS_DRES,
            )  # fmt: skip
            row += 1
        mask = cols < n_cols
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
            c1, c2 = _row_sums(DY, X, W, r64, stride_dy, stride_x, n_cols, mean, rstd, HAS_WEIGHT, BLOCK_SIZE, 0)
            start = tl.program_id(0) * 0
            while start < n_cols:
                cols = start + tl.arange(0, BLOCK_SIZE)
                mask = cols < n_cols
                dw = tl.load(DW + cols, mask=mask, other=0.0) if HAS_WEIGHT else tl.zeros([BLOCK_SIZE], tl.float32)
                db = tl.load(DB + cols, mask=mask, other=0.0) if HAS_BIAS else tl.zeros([BLOCK_SIZE], tl.float32)
                dw, db = _store_dx(
                    DY, X, W, DRES, DX, r64, stride_dy, stride_x, stride_dres, n_cols, cols, mean, rstd, c1, c2,
                    dw, db, IS_RMS, HAS_WEIGHT, HAS_BIAS, HAS_DRES,
                )  # fmt: skip
                if HAS_WEIGHT:
                    tl.store(DW + cols, dw, mask=mask)
                if HAS_BIAS:
                    tl.store(DB + cols, db, mask=mask)
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


# --- host launcher --------------------------------------------------------------------------------------------

_PARTIAL_BLOCK_P = 32
_PARTIAL_BLOCK_N = 64


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


def _norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    dres: torch.Tensor | None,
    weight: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor,
    is_rms: bool,
    has_bias: bool,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dweight, dbias)``; ``dweight``/``dbias`` are ``None`` without a weight / bias. ``config`` replaces
    the launch :func:`norm_config` chooses (benchmarks sweep it); it must cover the row as that one does."""
    n_cols = x.shape[-1]
    dx, dw, db = _backward_outputs(x, weight, has_bias)
    n_params = (weight is not None) + has_bias  # their fp32 partials share one allocation (below)
    if x.numel() == 0:
        return dx, None if dw is None else dw.zero_(), None if db is None else db.zero_()
    x2, n_rows, stride_x = rows_of(x)
    dy2, _, stride_dy = rows_of(dy)
    dres2, _, stride_dres = rows_of(dres) if dres is not None else (dy2, n_rows, stride_dy)
    device = device_info(x.device)
    if config is None:
        block_cap = current_max_block_size()
        config = norm_config(n_cols, x.dtype, device, backward=True, max_block=block_cap, layernorm=not is_rms)
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
            REREAD_ROW=config.reread_row,
            SUM_BLOCK=config.chunk_size or NORM_BWD_SUM_BLOCK,
            UNROLLED=config.unrolled,
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


# --- custom op (torch.compile, CUDA graphs) ------------------------------------------------------------------
# Its outputs are tensors: absent ones travel as empty tensors.


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


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


def norm_backward(
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


# --- ahead-of-time builds ----------------------------------------------------------------------------------


def build_name(variant: str, direction: str, dtype: torch.dtype, hidden: int, config: LaunchConfig) -> str:
    """A norm build's name: the variant, ``fwd`` or ``bwd``, and the launch it stands for, e.g.
    ``triton.rmsnorm_bwd[fp16,N=16384,BLOCK=16384,reread]`` (``single``: a row in one block, held from its
    one read; ``reread``: in one block, read twice; ``looped``: in blocks of ``BLOCK``)."""
    kind = "looped" if not config.single_block else "reread" if config.reread_row else "single"
    return f"triton.{variant}_{direction}[{TYPE_NAMES[dtype]},N={hidden},BLOCK={config.block_size},{kind}]"


def backward_build(
    device: DeviceInfo, dtype: torch.dtype, hidden: int, variant: str, *, is_rms: bool, residual: bool, bias: bool
) -> KernelBuild:
    """The backward build of the (weighted) ``variant`` (``layernorm``, ``fused_add_rmsnorm``, ...) at rows of
    ``hidden`` elements, as launched on ``device`` in ``dtype``: RMSNorm when ``is_rms``, with the residual's
    gradient added when ``residual``, and a bias.

    Contiguous rows of a multiple of 16 elements, as at every representative hidden size: the pointers, the row
    length and the strides carry the divisibility Triton's launcher specializes on, so the build has the vector
    loads (and the registers) of the real launch."""
    from llamatelemetry_core.aot import KernelBuild, kernel_signature

    t = TYPE_NAMES[dtype]
    pointers = {
        **dict.fromkeys(("DY", "X", "W", "DRES", "DX"), t),
        **dict.fromkeys(("Mean", "Rstd", "DW", "DB"), "fp32"),
    }
    types = {name: f"*{pt}:16" for name, pt in pointers.items()}
    types |= dict.fromkeys(("stride_dy", "stride_x", "stride_dres", "n_cols"), "i32:16")
    config = norm_config(hidden, dtype, device, backward=True, layernorm=not is_rms)
    return KernelBuild(
        build_name(variant, "bwd", dtype, hidden, config),
        _norm_bwd_kernel,
        kernel_signature(_norm_bwd_kernel, types),
        {"IS_RMS": is_rms, "HAS_WEIGHT": True, "HAS_BIAS": bias, "HAS_DRES": residual}
        | {"SINGLE_BLOCK": config.single_block, "BLOCK_SIZE": config.block_size}
        | {
            "REREAD_ROW": config.reread_row,
            "SUM_BLOCK": config.chunk_size or NORM_BWD_SUM_BLOCK,
            "UNROLLED": config.unrolled,
        },
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
