"""The few-row linear kernel of :mod:`llamatelemetry_triton.ops.linear` and its launcher: the GEMV, the fused
residual add + RMSNorm in front of it, the SwiGLU epilogue. The references, custom ops, operations, public
functions, builds and registry entry are in ``linear.py``, which calls :func:`linear_forward`.

One program per ``BLOCK_N`` output columns: it computes the rows' sum of squares first when a norm is fused
(program 0 writing ``h`` on the way), then walks its weight rows (and, with SwiGLU, the matching up rows) in
``BLOCK_K`` steps, normalizing each block of the input rows as it goes; fp32 throughout, rounded where the
unfused composition rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llamatelemetry_core.environment import programmatic_launch
from llamatelemetry_triton._compat import gdc_launch_dependents, gdc_wait, tl, triton
from llamatelemetry_triton._dispatch import device_info
from llamatelemetry_triton._launch import on_device, rows_of
from llamatelemetry_triton.heuristics import LaunchConfig, current_max_block_size, linear_config
from llamatelemetry_triton.ops.glu import swiglu_reference

__all__ = ["linear_forward", "linear_kernel", "linear_outputs"]


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
def _sum_squares_step(  # type: ignore[no-untyped-def]
    acc, X, R, H, rows, row_mask, k0, K, stride_x, stride_r, h_rows,
    HAS_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    cols = k0 + tl.arange(0, BLOCK_K)
    mask = row_mask[:, None] if EVEN_K else row_mask[:, None] & (cols < K)[None, :]
    x = _input_block(X, R, H, rows, cols, mask, stride_x, stride_r, K, h_rows, HAS_RESIDUAL, True)
    return acc + x * x


@triton.jit  # type: ignore[untyped-decorator]
def _dot_step(  # type: ignore[no-untyped-def]
    acc, acc_up, X, R, H, NW, W, rows, row_mask, cols_n, n_mask, k0, N, K, stride_x, stride_r, stride_w, rstd,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SWIGLU: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_K: tl.constexpr, GLU_IN: tl.constexpr = False,
):  # fmt: skip
    """``acc [BLOCK_M, BLOCK_N] += input[:, k0:k0+BLOCK_K] @ W[cols_n, k0:k0+BLOCK_K]^T`` in fp32; with ``SWIGLU``
    also ``acc_up`` from the matching up rows ``cols_n + N``."""
    cols = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:
        x_mask = row_mask[:, None]
        w_mask = n_mask[:, None]
    else:
        k_mask = cols < K
        x_mask = row_mask[:, None] & k_mask[None, :]
        w_mask = n_mask[:, None] & k_mask[None, :]
    # The weight is read once per step and never again: evict it first, keep the rows and the norm in L2.
    w = tl.load(W + cols_n[:, None] * stride_w + cols[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
    x = _input_block(X, R, H, rows, cols, x_mask, stride_x, stride_r, K, 0, HAS_RESIDUAL, False, GLU_IN)
    if NORM:
        nw = tl.load(NW + cols, mask=cols < K, other=0.0).to(tl.float32)
        # Rounded to x's dtype as the norm kernel's output is, before the product.
        x = (x * rstd[:, None] * nw[None, :]).to(X.dtype.element_ty).to(tl.float32)
    acc += tl.sum(x[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if SWIGLU:
        up_rows = cols_n + N
        w_up = tl.load(
            W + up_rows[:, None] * stride_w + cols[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first"
        )
        acc_up += tl.sum(x[:, None, :] * w_up.to(tl.float32)[None, :, :], axis=2)
    return acc, acc_up


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
):
    if USE_PDL:  # launched as a dependent: wait for the kernel before (it may write the input rows)
        gdc_wait()
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = cols_n < N
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORM:
        # The row's sum of squares (program 0 writes h on the way); every program computes it, from L2.
        sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        h_rows = tl.where(pid == 0, M, 0)  # program 0 writes h; the others' rows mask is empty
        if PIPELINED:
            for k0 in range(0, K, BLOCK_K):
                sq = _sum_squares_step(sq, X, R, H, rows, row_mask, k0, K, stride_x, stride_r, h_rows,
                                       HAS_RESIDUAL, EVEN_K, BLOCK_K)  # fmt: skip
        else:
            # `while`, not `range()`: Triton 3.6's interpreter cannot take runtime range() bounds under NumPy 2.4.
            k0 = pid * 0
            while k0 < K:
                sq = _sum_squares_step(sq, X, R, H, rows, row_mask, k0, K, stride_x, stride_r, h_rows,
                                       HAS_RESIDUAL, EVEN_K, BLOCK_K)  # fmt: skip
                k0 += BLOCK_K
        rstd = tl.math.rsqrt(tl.sum(sq, axis=1) / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if SWIGLU:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc_up = tl.zeros([1, 1], dtype=tl.float32)  # unused
    if PIPELINED:
        for k0 in range(0, K, BLOCK_K):
            acc, acc_up = _dot_step(acc, acc_up, X, R, H, NW, W, rows, row_mask, cols_n, n_mask, k0, N, K, stride_x,
                                    stride_r, stride_w, rstd, NORM, HAS_RESIDUAL, SWIGLU, EVEN_K, BLOCK_K,
                                    GLU_IN)  # fmt: skip
    else:
        k0 = pid * 0
        while k0 < K:
            acc, acc_up = _dot_step(acc, acc_up, X, R, H, NW, W, rows, row_mask, cols_n, n_mask, k0, N, K, stride_x,
                                    stride_r, stride_w, rstd, NORM, HAS_RESIDUAL, SWIGLU, EVEN_K, BLOCK_K,
                                    GLU_IN)  # fmt: skip
            k0 += BLOCK_K
    if USE_PDL:  # the weight is read: the next kernel may start
        gdc_launch_dependents()
    if HAS_BIAS:
        acc += tl.load(B + cols_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        if HAS_BIAS:
            acc_up += tl.load(B + N + cols_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        # gate and up rounded to the output dtype, as the projection's output is before the SwiGLU kernel reads it
        gate = acc.to(Y.dtype.element_ty).to(tl.float32)
        acc = gate * tl.sigmoid(gate) * acc_up.to(Y.dtype.element_ty).to(tl.float32)
    tl.store(
        Y + rows[:, None] * N + cols_n[None, :], acc.to(Y.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :]
    )


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
    r2, _, stride_r = rows_of(residual) if residual is not None else (x2, rows, stride_x)
    if config is None:
        config = linear_config(rows, rows_w, k, x.dtype, device_info(x.device), max_block=current_max_block_size())
    n = y.shape[-1]
    # With SwiGLU a program reads BLOCK_N gate rows and the BLOCK_N up rows that match them.
    block_n = max(1, config.block_size // 2) if swiglu else config.block_size
    pdl = programmatic_launch(x)
    with on_device(x):
        linear_kernel[(triton.cdiv(n, block_n),)](
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
            BLOCK_M=max(1, 1 << (rows - 1).bit_length()),
            BLOCK_N=block_n,
            BLOCK_K=config.chunk_size,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            enable_fp_fusion=True,
            launch_pdl=pdl,
        )
    return y, h
