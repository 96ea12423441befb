"""The few-row linear kernel of :mod:`llamatelemetry_triton.ops.linear` and its launcher: the GEMV, the fused
residual add + RMSNorm in front of it, the SwiGLU epilogue. The references, custom ops, operations, public
functions, builds and registry entry are in ``linear.py``, which calls :func:`linear_forward`.

One program per ``BLOCK_N`` output columns: it computes the rows' sum of squares first when a norm is fused
(program 0 writing ``h`` on the way), then walks its weight rows (and, with SwiGLU, the matching up rows) in
``BLOCK_K`` steps, normalizing each block of the input rows as it goes; fp32 throughout, rounded where the
unfused composition rounds. A persistent launch (``config.programs`` programs, fewer than the column blocks, with
``BLOCK_K`` covering ``K``; chosen on Hopper where the rows fit in registers) reads and normalizes each program's
input rows once, then walks column blocks ``p, p + G, ...``, each block's weight load issued before the previous
block's product: the weight stream does not stop at a block's arithmetic or its store.

Past :data:`~llamatelemetry_triton.heuristics.LINEAR_MAX_ROWS` rows (up to
:data:`~llamatelemetry_triton.heuristics.SMALL_M_MAX_ROWS`, fp16/bf16, the plain and SwiGLU-epilogue forms) the
products go to the Tensor Cores: :func:`small_m_kernel`, one program per ``BLOCK_N`` output columns and split of
``K``, all rows in one ``BLOCK_M`` tile. With ``SPLIT_K`` splits each program writes its fp32 partial, and the
last program of a column block to arrive (an atomic count) sums the partials in split order and writes the
result: deterministic, whatever order the programs finish in. That program also sets its count back to zero, so
the counts (:func:`split_counters`) are kept between launches instead of zero-filled before each one.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from llamatelemetry_core.capture import capturing_graph
from llamatelemetry_core.environment import programmatic_launch
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_triton._compat import gdc_launch_dependents, gdc_wait, tl, triton
from llamatelemetry_triton._dispatch import device_info
from llamatelemetry_triton._launch import on_device, rows_of
from llamatelemetry_triton.heuristics import (
    LINEAR_MAX_ROWS,
    LaunchConfig,
    current_max_block_size,
    linear_config,
    small_m_config,
)
from llamatelemetry_triton.ops.glu import swiglu_reference

__all__ = ["linear_forward", "linear_kernel", "linear_outputs", "small_m_kernel", "small_m_launch", "split_counters"]


# --- kernels ----------------------------------------------------------------------------------------------


@triton.jit  # type: ignore[untyped-decorator]
def _input_block(  # type: ignore[no-untyped-def]
    X,
    R,
    H,
    rows,
    cols,
    mask,
    stride_x,
    stride_r,
    K,
    h_rows,
    HAS_RESIDUAL: tl.constexpr,
    STORE_H: tl.constexpr,
    GLU_IN: tl.constexpr = False,
):
    """``[BLOCK_M, BLOCK_K]`` of the input rows in fp32: ``x``, or ``h = x + residual`` rounded to ``h``'s dtype
    (the sum the model keeps), its first ``h_rows`` rows written to ``H`` when ``STORE_H``; with ``GLU_IN`` the
    rows are ``[gate | up]`` (``2K`` wide) and the block is ``silu(gate) * up`` rounded to ``X``'s dtype, as the
    SwiGLU kernel writes it."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if GLU_IN:
        u = tl.load(X + rows[:, None] * stride_x + K + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = (x * tl.sigmoid(x) * u).to(X.dtype.element_ty).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        if STORE_H:
            tl.store(H + rows[:, None] * K + cols[None, :], h, mask=mask & (rows < h_rows)[:, None])
        x = h.to(tl.float32)
    return x


@triton.jit  # type: ignore[untyped-decorator]
def _block_mask(row_mask, cols, K, EVEN_K: tl.constexpr):  # type: ignore[no-untyped-def]
    """The mask of a block ``[rows, cols]`` (input rows or weight rows): the rows alone when every block of ``K`` is
    whole, else the columns past ``K`` too."""
    return row_mask[:, None] if EVEN_K else row_mask[:, None] & (cols < K)[None, :]


@triton.jit  # type: ignore[untyped-decorator]
def _normalized(x, NW, cols, K, rstd, dtype: tl.constexpr):  # type: ignore[no-untyped-def]
    """RMSNorm of an fp32 input block ``x [rows, cols]`` with its rows' ``rstd`` and the norm weight at ``cols``,
    rounded to the input's ``dtype`` as the norm kernel's output is, before any product."""
    nw = tl.load(NW + cols, mask=cols < K, other=0.0).to(tl.float32)
    return (x * rstd[:, None] * nw[None, :]).to(dtype).to(tl.float32)


@triton.jit  # type: ignore[untyped-decorator]
def _sum_squares_step(  # type: ignore[no-untyped-def]
    acc, X, R, H, rows, row_mask, k0, K, stride_x, stride_r, h_rows,
    HAS_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = _block_mask(row_mask, cols, K, EVEN_K)
    x = _input_block(X, R, H, rows, cols, mask, stride_x, stride_r, K, h_rows, HAS_RESIDUAL, True)
    return acc + x * x


@triton.jit  # type: ignore[untyped-decorator]
def _weight_tiles(W, cols, cols_n, w_mask, N, stride_w, SWIGLU: tl.constexpr):  # type: ignore[no-untyped-def]
    """The weight rows ``cols_n`` at ``cols`` (and, with ``SWIGLU``, the matching up rows ``cols_n + N``; else a
    placeholder)."""
    # The weight is read once per step and never again: evict it first, keep the rows and the norm in L2.
    w = tl.load(W + cols_n[:, None] * stride_w + cols[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
    if SWIGLU:
        up_rows = cols_n + N
        w_up = tl.load(
            W + up_rows[:, None] * stride_w + cols[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first"
        )
    else:
        w_up = tl.zeros([1, 1], dtype=W.dtype.element_ty)
    return w, w_up


@triton.jit  # type: ignore[untyped-decorator]
def _tiles_product(acc, acc_up, x, w, w_up, SWIGLU: tl.constexpr):  # type: ignore[no-untyped-def]
    """``acc [BLOCK_M, BLOCK_N] += x @ w^T`` on CUDA cores in fp32 for an input block ``x [BLOCK_M, BLOCK_K]``
    (fp32); with ``SWIGLU`` also ``acc_up += x @ w_up^T``."""
    acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if SWIGLU:
        acc_up += tl.sum(x[:, None, :] * w_up.to(tl.float32)[None, :, :], axis=2)
    return acc, acc_up


@triton.jit  # type: ignore[untyped-decorator]
def _dot_step(  # type: ignore[no-untyped-def]
    acc, acc_up, X, R, H, NW, W, rows, row_mask, cols_n, n_mask, k0, N, K, stride_x, stride_r, stride_w, rstd,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_K: tl.constexpr, GLU_IN: tl.constexpr = False,
):  # fmt: skip
    """``acc [BLOCK_M, BLOCK_N] += input[:, k0:k0+BLOCK_K] @ W[cols_n, k0:k0+BLOCK_K]^T`` in fp32; with ``SWIGLU``
    also ``acc_up`` from the matching up rows ``cols_n + N``."""
    cols = k0 + tl.arange(0, BLOCK_K)
    w, w_up = _weight_tiles(W, cols, cols_n, _block_mask(n_mask, cols, K, EVEN_K), N, stride_w, SWIGLU)
    x_mask = _block_mask(row_mask, cols, K, EVEN_K)
    x = _input_block(X, R, H, rows, cols, x_mask, stride_x, stride_r, K, 0, HAS_RESIDUAL, False, GLU_IN)
    if NORM:
        x = _normalized(x, NW, cols, K, rstd, X.dtype.element_ty)
    return _tiles_product(acc, acc_up, x, w, w_up, SWIGLU)


@triton.jit  # type: ignore[untyped-decorator]
def _store_rows(  # type: ignore[no-untyped-def]
    acc, acc_up, B, Y, offsets, cols_n, n_mask, out_mask, N, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr
):
    """The epilogue of both kernels: bias, SwiGLU (gate and up rounded to the output dtype first, as the
    projection's output is before the SwiGLU kernel reads it), the store at ``offsets``."""
    if HAS_BIAS:
        acc += tl.load(B + cols_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        if HAS_BIAS:
            acc_up += tl.load(B + N + cols_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        gate = acc.to(Y.dtype.element_ty).to(tl.float32)
        acc = gate * tl.sigmoid(gate) * acc_up.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + offsets, acc.to(Y.dtype.element_ty), mask=out_mask)


@triton.jit  # type: ignore[untyped-decorator]
def linear_kernel(  # type: ignore[no-untyped-def]
    X,
    R,
    NW,
    W,
    B,
    Y,
    H,
    M,
    N,
    K,
    stride_x,
    stride_r,
    stride_w,
    eps,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SWIGLU: tl.constexpr,
    EVEN_K: tl.constexpr,
    PIPELINED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GLU_IN: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
    PERSISTENT: tl.constexpr = False,
):
    """``Y [M, N]`` of the few-row forms (see the module). Program ``p`` takes column block ``p`` and loops over
    ``K`` in ``BLOCK_K`` steps; with ``PERSISTENT`` (``BLOCK_K`` covering ``K``) it reads its input rows once
    (normalized when ``NORM``) and takes column blocks ``p, p + G, ...`` of the ``G`` programs launched, each
    block's weight loaded while the block before is multiplied."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    h_rows = tl.where(pid == 0, M, 0)  # program 0 writes h; the others' rows mask is empty
    if PERSISTENT:
        cols = tl.arange(0, BLOCK_K)
        n_blocks = tl.cdiv(N, BLOCK_N)
        step = tl.num_programs(0)
        if USE_PDL:  # launched as a dependent: wait for the kernel before (it may write the input rows)
            gdc_wait()
        # The first block's weight load goes out before the input rows are read. Issuing it before the wait above
        # (no kernel writes the weight) was tried: 1,061 against 1,059 tokens/s at batch 1, within the spread.
        w, w_up = _block_weight(W, cols, pid, N, K, stride_w, SWIGLU, EVEN_K, BLOCK_N)
        # One input block for every column block of this program: read, summed and normalized once.
        x_mask = _block_mask(row_mask, cols, K, EVEN_K)
        x = _input_block(X, R, H, rows, cols, x_mask, stride_x, stride_r, K, h_rows, HAS_RESIDUAL, True, GLU_IN)
        if NORM:
            rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / K + eps)
            x = _normalized(x, NW, cols, K, rstd, X.dtype.element_ty)
        if PIPELINED:
            for b in range(pid, n_blocks, step):
                w, w_up = _prefetched_block(x, w, w_up, W, B, Y, rows, row_mask, cols, b, step, N, K, stride_w,
                                            HAS_BIAS, SWIGLU, EVEN_K, BLOCK_M, BLOCK_N)  # fmt: skip
        else:
            # `while`, not `range()`: Triton 3.6's interpreter cannot take runtime range() bounds under NumPy 2.4.
            b = pid
            while b < n_blocks:
                w, w_up = _prefetched_block(x, w, w_up, W, B, Y, rows, row_mask, cols, b, step, N, K, stride_w,
                                            HAS_BIAS, SWIGLU, EVEN_K, BLOCK_M, BLOCK_N)  # fmt: skip
                b += step
    else:
        if USE_PDL:  # launched as a dependent: wait for the kernel before (it may write the input rows)
            gdc_wait()
        rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
        if NORM:
            # The row's sum of squares (program 0 writes h on the way); every program computes it, from L2.
            sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
            if PIPELINED:
                for k0 in range(0, K, BLOCK_K):
                    sq = _sum_squares_step(sq, X, R, H, rows, row_mask, k0, K, stride_x, stride_r, h_rows,
                                           HAS_RESIDUAL, EVEN_K, BLOCK_K)  # fmt: skip
            else:
                k0 = pid * 0
                while k0 < K:
                    sq = _sum_squares_step(sq, X, R, H, rows, row_mask, k0, K, stride_x, stride_r, h_rows,
                                           HAS_RESIDUAL, EVEN_K, BLOCK_K)  # fmt: skip
                    k0 += BLOCK_K
            rstd = tl.math.rsqrt(tl.sum(sq, axis=1) / K + eps)
        cols_n, n_mask, acc, acc_up = _block_start(pid, N, SWIGLU, BLOCK_M, BLOCK_N)
        if PIPELINED:
            for k0 in range(0, K, BLOCK_K):
                acc, acc_up = _dot_step(acc, acc_up, X, R, H, NW, W, rows, row_mask, cols_n, n_mask, k0, N, K,
                                        stride_x, stride_r, stride_w, rstd, NORM, HAS_RESIDUAL, SWIGLU, EVEN_K,
                                        BLOCK_K, GLU_IN)  # fmt: skip
        else:
            k0 = pid * 0
            while k0 < K:
                acc, acc_up = _dot_step(acc, acc_up, X, R, H, NW, W, rows, row_mask, cols_n, n_mask, k0, N, K,
                                        stride_x, stride_r, stride_w, rstd, NORM, HAS_RESIDUAL, SWIGLU, EVEN_K,
                                        BLOCK_K, GLU_IN)  # fmt: skip
                k0 += BLOCK_K
        _store_block(acc, acc_up, B, Y, rows, row_mask, cols_n, n_mask, N, HAS_BIAS, SWIGLU)
    if USE_PDL:  # the weight is read: the next kernel may start
        gdc_launch_dependents()


@triton.jit  # type: ignore[untyped-decorator]
def _block_weight(  # type: ignore[no-untyped-def]
    W, cols, b, N, K, stride_w, SWIGLU: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr
):
    """:func:`_weight_tiles` of column block ``b`` over the columns ``cols`` (nothing read past the last block)."""
    cols_n = b.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return _weight_tiles(W, cols, cols_n, _block_mask(cols_n < N, cols, K, EVEN_K), N, stride_w, SWIGLU)


@triton.jit  # type: ignore[untyped-decorator]
def _hoisted_block(  # type: ignore[no-untyped-def]
    x, w, w_up, B, Y, rows, row_mask, b, N,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Column block ``b`` from an input block ``x`` covering ``K`` and its weight tiles: product and store."""
    cols_n, n_mask, acc, acc_up = _block_start(b, N, SWIGLU, BLOCK_M, BLOCK_N)
    acc, acc_up = _tiles_product(acc, acc_up, x, w, w_up, SWIGLU)
    _store_block(acc, acc_up, B, Y, rows, row_mask, cols_n, n_mask, N, HAS_BIAS, SWIGLU)


@triton.jit  # type: ignore[untyped-decorator]
def _block_start(b, N, SWIGLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # type: ignore[no-untyped-def]
    """Column block ``b``'s output columns, their mask, and zeroed accumulators (the up one a placeholder
    without ``SWIGLU``)."""
    cols_n = b.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SWIGLU:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc_up = tl.zeros([1, 1], dtype=tl.float32)  # unused
    return cols_n, cols_n < N, acc, acc_up


@triton.jit  # type: ignore[untyped-decorator]
def _store_block(  # type: ignore[no-untyped-def]
    acc, acc_up, B, Y, rows, row_mask, cols_n, n_mask, N, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr
):
    """:func:`_store_rows` of a few-row block: the rows of ``Y [M, N]`` at columns ``cols_n``."""
    out_mask = row_mask[:, None] & n_mask[None, :]
    _store_rows(acc, acc_up, B, Y, rows[:, None] * N + cols_n[None, :], cols_n, n_mask, out_mask, N, HAS_BIAS, SWIGLU)


@triton.jit  # type: ignore[untyped-decorator]
def _prefetched_block(  # type: ignore[no-untyped-def]
    x, w, w_up, W, B, Y, rows, row_mask, cols, b, step, N, K, stride_w,
    HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Column block ``b`` of a persistent program from its loaded weight ``(w, w_up)``, the load of block ``b +
    step`` issued first (nothing is read past the last block); returns that next block's weight."""
    w_next, w_up_next = _block_weight(W, cols, b + step, N, K, stride_w, SWIGLU, EVEN_K, BLOCK_N)
    _hoisted_block(x, w, w_up, B, Y, rows, row_mask, b, N, HAS_BIAS, SWIGLU, BLOCK_M, BLOCK_N)
    return w_next, w_up_next


@triton.jit  # type: ignore[untyped-decorator]
def _mma_step(  # type: ignore[no-untyped-def]
    acc, acc_up, X, W, rows, row_mask, cols_n, n_mask, k0, N, K, stride_x, stride_w,
    SWIGLU: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``acc [BLOCK_M, BLOCK_N] += x[:, k0:k0+BLOCK_K] @ W[cols_n, k0:k0+BLOCK_K]^T`` on the Tensor Cores (fp32
    accumulation); with ``SWIGLU`` also ``acc_up`` from the up rows ``cols_n + N``."""
    cols = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=_block_mask(row_mask, cols, K, EVEN_K), other=0.0)
    w, w_up = _weight_tiles(W, cols, cols_n, _block_mask(n_mask, cols, K, EVEN_K), N, stride_w, SWIGLU)
    acc = tl.dot(x, tl.trans(w), acc)
    if SWIGLU:
        acc_up = tl.dot(x, tl.trans(w_up), acc_up)
    return acc, acc_up


@triton.jit  # type: ignore[untyped-decorator]
def small_m_kernel(  # type: ignore[no-untyped-def]
    X,
    W,
    B,
    Y,
    P,
    C,
    M,
    N,
    K,
    k_split,
    stride_x,
    stride_w,
    HAS_BIAS: tl.constexpr,
    SWIGLU: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PIPELINED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """``Y [M, N] = X [M, K] @ W[:N]^T (+ B)`` (with ``SWIGLU``: ``silu(gate) * up`` of ``W = [W_gate; W_up]``)
    for ``M <= BLOCK_M``: program ``(n, s)`` multiplies every row by weight rows ``n * BLOCK_N...`` over ``K``'s
    split ``s`` (``k_split`` long, a multiple of ``BLOCK_K``). With ``SPLIT_K > 1`` (not with ``SWIGLU``), ``P``
    holds ``SPLIT_K`` fp32 partials ``[M, N]`` and ``C`` one int32 count per column block, zero at the start;
    the last split of each block to arrive sets its count back to zero."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols_n < N
    if USE_PDL:  # launched as a dependent: wait for the kernel before (it may write the input rows)
        gdc_wait()
    k_lo = pid_k * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PIPELINED:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            acc, acc_up = _mma_step(acc, acc_up, X, W, rows, row_mask, cols_n, n_mask, k0, N, K, stride_x, stride_w,
                                    SWIGLU, EVEN_K, BLOCK_K)  # fmt: skip
    else:
        # `while`, not `range()`: Triton 3.6's interpreter cannot take runtime range() bounds under NumPy 2.4.
        k0 = k_lo
        while k0 < k_hi:
            acc, acc_up = _mma_step(acc, acc_up, X, W, rows, row_mask, cols_n, n_mask, k0, N, K, stride_x, stride_w,
                                    SWIGLU, EVEN_K, BLOCK_K)  # fmt: skip
            k0 += BLOCK_K
    if USE_PDL:  # the weight is read: the next kernel may start
        gdc_launch_dependents()
    out_mask = row_mask[:, None] & n_mask[None, :]
    offsets = rows[:, None] * N + cols_n[None, :]
    if SPLIT_K > 1:
        tl.store(P + pid_k.to(tl.int64) * M * N + offsets, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial is written before the count is released
        arrived = tl.atomic_add(C + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last split of this column block: sum the partials in split order
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(P + s * M.to(tl.int64) * N + offsets, mask=out_mask, other=0.0, cache_modifier=".cg")
            _store_rows(total, acc_up, B, Y, offsets, cols_n, n_mask, out_mask, N, HAS_BIAS, False)
            tl.store(C + pid_n, 0)  # every split has arrived: the count is zero again for the next launch
    else:
        _store_rows(acc, acc_up, B, Y, offsets, cols_n, n_mask, out_mask, N, HAS_BIAS, SWIGLU)


# --- host launcher ------------------------------------------------------------------------------------------


def linear_outputs(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, swiglu: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    h = None if residual is None else torch.empty(x.shape, dtype=torch.result_type(x, residual), device=x.device)
    return y, h


def linear_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    swiglu: bool = False,
    config: LaunchConfig | None = None,
    glu_input: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, h)`` of one launch; ``norm_weight`` ``None`` means no norm (and no residual). ``config`` (weight rows
    per program in ``block_size``, BLOCK_K in ``chunk_size``) replaces the heuristic's choice: for sweeps."""
    y, h = linear_outputs(x, residual, weight, swiglu)
    rows_w, k = weight.shape
    x2, rows, stride_x = rows_of(x)
    if y.numel() == 0 or k == 0:
        if h is not None and residual is not None:
            torch.add(x, residual, out=h)
        if k == 0:  # no products: the bias alone (through the activation)
            full = F.linear(x, weight, bias)
            y.copy_(swiglu_reference(*full.chunk(2, dim=-1)) if swiglu else full)
        return y, h
    if rows > LINEAR_MAX_ROWS:
        if residual is not None or norm_weight is not None or glu_input:
            raise ConfigurationError(
                f"the small-M kernel (more than {LINEAR_MAX_ROWS} rows) takes the plain and SwiGLU-epilogue forms only"
            )
        _small_m_forward(x2, rows, stride_x, weight, bias, y, swiglu, config)
        return y, h
    r2, _, stride_r = rows_of(residual) if residual is not None else (x2, rows, stride_x)
    if config is None:
        config = linear_config(rows, rows_w, k, x.dtype, device_info(x.device), max_block=current_max_block_size())
    n = y.shape[-1]
    # With SwiGLU a program reads BLOCK_N gate rows and the BLOCK_N up rows that match them.
    block_n = max(1, config.block_size // 2) if swiglu else config.block_size
    pdl = programmatic_launch(x)
    blocks = triton.cdiv(n, block_n)
    persistent = 0 < config.programs < blocks
    if persistent and config.chunk_size < k:
        raise ConfigurationError(
            f"a persistent few-row launch ({config.programs} programs) holds the input rows whole: expected BLOCK_K "
            f"(chunk_size) >= K = {k}, got {config.chunk_size}; launch it with a BLOCK_K covering K, or programs=0"
        )
    with on_device(x):
        linear_kernel[(min(blocks, config.programs) if persistent else blocks,)](
            x2,
            r2,
            norm_weight.contiguous() if norm_weight is not None else x2,
            weight,
            bias.contiguous() if bias is not None else weight,
            y,
            h if h is not None else y,
            rows,
            n,
            k,
            stride_x,
            stride_r,
            weight.stride(0),
            eps,
            NORM=norm_weight is not None,
            HAS_RESIDUAL=residual is not None,
            HAS_BIAS=bias is not None,
            SWIGLU=swiglu,
            EVEN_K=k % config.chunk_size == 0,
            PIPELINED=x.is_cuda,
            GLU_IN=glu_input,
            USE_PDL=pdl,
            PERSISTENT=persistent,
            BLOCK_M=max(1, 1 << (rows - 1).bit_length()),
            BLOCK_N=block_n,
            BLOCK_K=config.chunk_size,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            enable_fp_fusion=True,
            launch_pdl=pdl,
        )
    return y, h


_MIN_COUNTERS = 256  # counts kept per stream or graph: room for 256 column blocks before the buffer grows
_STREAM_COUNTERS: dict[tuple[int, int], torch.Tensor] = {}
_GRAPH_COUNTERS: weakref.WeakKeyDictionary[object, torch.Tensor] = weakref.WeakKeyDictionary()


def split_counters(device: torch.device, blocks: int) -> torch.Tensor:
    """At least ``blocks`` int32 counts on ``device``, all zero for the next split-K launch of
    :func:`small_m_kernel`, which leaves them zero again (the last split of each column block resets its count).

    A launch then needs no zero-fill of its own: one kernel fewer per launch, and nothing between the projections
    that would break their programmatic dependent launch chain. Counts are shared only by launches that run in
    order: per CUDA stream, and, while a stream captures a CUDA graph, per graph (their own buffer, zero-filled
    once at the start of every replay, released with the graph). Where the capturing graph cannot be identified
    (:func:`llamatelemetry_core.capture.capturing_graph`: a capture made outside ``llamatelemetry-graphs`` on a
    torch without ``CUDAGraph.get_currently_capturing_graph``, such as 2.11), and on a CPU (Triton's
    interpreter), every launch gets fresh zeros.
    """
    if device.type != "cuda":
        return torch.zeros(blocks, dtype=torch.int32, device=device)
    if torch.cuda.is_current_stream_capturing():
        graph = capturing_graph()
        if graph is None:
            return torch.zeros(blocks, dtype=torch.int32, device=device)
        counters = _GRAPH_COUNTERS.get(graph)
        if counters is None or counters.numel() < blocks:
            counters = _GRAPH_COUNTERS[graph] = _zeroed_counters(device, blocks)
        return counters
    stream = torch.cuda.current_stream(device)
    key = (stream.device_index, stream.stream_id)
    counters = _STREAM_COUNTERS.get(key)
    if counters is None or counters.numel() < blocks:
        counters = _STREAM_COUNTERS[key] = _zeroed_counters(device, blocks)
    return counters


def _zeroed_counters(device: torch.device, blocks: int) -> torch.Tensor:
    # A smaller buffer given up for this one is released in stream order: launches queued before still read it.
    return torch.zeros(max(blocks, _MIN_COUNTERS), dtype=torch.int32, device=device)


def small_m_launch(k: int, config: LaunchConfig) -> tuple[int, int]:
    """``(k_split, splits)`` of a small-M launch: each split ``k_split`` long (a multiple of BLOCK_K), as many
    splits as it takes to cover ``k`` (at most ``config.splits``)."""
    block_k = config.chunk_size
    k_split = triton.cdiv(triton.cdiv(k, max(1, config.splits)), block_k) * block_k
    return k_split, triton.cdiv(k, k_split)


def _small_m_forward(
    x2: torch.Tensor,
    rows: int,
    stride_x: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    y: torch.Tensor,
    swiglu: bool,
    config: LaunchConfig | None,
) -> None:
    """One :func:`small_m_kernel` launch writing ``y``; ``config`` (BLOCK_N in ``block_size``, BLOCK_K in
    ``chunk_size``, K splits in ``splits``) replaces the heuristic's choice."""
    n, k = y.shape[-1], weight.shape[1]
    if config is None:
        config = small_m_config(rows, n, k, swiglu, x2.dtype, device_info(x2.device))
        if config is None:
            raise ConfigurationError(f"no small-M launch is measured for {x2.device} in {x2.dtype}")
    k_split, splits = small_m_launch(k, config)
    if swiglu and splits > 1:
        raise ConfigurationError("the SwiGLU epilogue needs whole rows of K: launch it with splits=1")
    block_n = config.block_size
    if splits > 1:
        partials = torch.empty((splits, rows, n), dtype=torch.float32, device=x2.device)
        counts = split_counters(x2.device, triton.cdiv(n, block_n))
    else:
        partials = counts = y
    pdl = programmatic_launch(x2)
    with on_device(x2):
        small_m_kernel[(triton.cdiv(n, block_n), splits)](
            x2,
            weight,
            bias.contiguous() if bias is not None else weight,
            y,
            partials,
            counts,
            rows,
            n,
            k,
            k_split,
            stride_x,
            weight.stride(0),
            HAS_BIAS=bias is not None,
            SWIGLU=swiglu,
            SPLIT_K=splits,
            EVEN_K=k % config.chunk_size == 0,
            PIPELINED=x2.is_cuda,
            BLOCK_M=max(16, 1 << (rows - 1).bit_length()),
            BLOCK_N=block_n,
            BLOCK_K=config.chunk_size,
            USE_PDL=pdl,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            enable_fp_fusion=True,
            launch_pdl=pdl,
        )
