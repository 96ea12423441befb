"""FlashAttention-2 forward pass as a Triton kernel: exact attention in O(n) memory.

What it computes is :func:`~llamatelemetry_flashattn.reference.attention_reference` (causal masking aligned to
the end of the keys, sliding window, softcap, grouped-query attention; a query that sees no key gets zeros).
Layout ``[batch, seqlen, heads, head_dim]``, any strides; fp16/bf16 on GPUs (fp32 too in the interpreter).

The algorithm is the one of Dao et al., *FlashAttention-2* (2023): a program owns a tile of query rows and walks
the key/value tiles once, keeping for every row the running maximum ``m`` of its logits, the running sum ``l``
of ``exp(logit - m)`` and the running, unnormalised output; a larger maximum rescales both by
``exp(m_old - m_new)`` (the "online softmax" of Milakov & Gimelshein, 2018). Only tiles live in memory, never the
``n x n`` matrix. Details of this implementation:

* Rows are (query, head) pairs of one key/value head: the ``G = H / H_kv`` query heads that share a KV head are
  packed into the row dimension, so K and V are read once per KV head (a decode step with GQA is one program per
  KV head, not ``G``).
* The key range a tile of rows can see is computed first (causal end, window start), and tiles outside it are
  never loaded. Inside the range, tiles every row sees completely run without any masking; only the boundary
  tiles (window start, causal diagonal, sequence end) build the mask. The three phases are unrolled at compile
  time (``tl.static_range``), so the unmasked loop carries no mask code.
* On a GPU the loops are ``range`` loops, which Triton software-pipelines (``num_stages``); in the interpreter
  (``PIPELINED=False``) they are ``while`` loops, because Triton 3.6's interpreter cannot take runtime ``range``
  bounds under NumPy 2.4.
* K and V tiles are read through block pointers where Triton has them (before 3.8), and from 3.8 on (3.9
  removed them) through plain pointer arithmetic from a 64-bit scalar per tile, with masks only where a tile
  may cross the sequence end or a padded head dimension (:data:`BLOCK_POINTERS` says which form runs).
* ``enable_fp_fusion=True`` at launch: FMAs as every Triton up to 3.9 emits by default (3.10 changes it).
* exp2 with ``log2(e)`` folded into the scale; accumulation in fp32; rows with no visible key are guarded so
  that no ``exp(-inf - -inf)`` NaN can arise.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_flashattn._attention_tile import (
    kernel_scales,
    key_span,
    online_softmax,
    phase_span,
    tile_logits,
    unmasked_span,
    window_bounds,
)
from llamatelemetry_flashattn.tiles import TileConfig, choose_tiles

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild

__all__ = ["AOT_HEAD_DIMS", "BLOCK_POINTERS", "aot_build", "aot_builds", "triton_attention"]

# Block pointers where Triton still has them without a deprecation (before 3.8; 3.9 removed them): the code the
# kernel was tuned with. From 3.8 on, tiles are addressed with plain pointer arithmetic and masks instead. On
# Triton 3.6 the block-pointer form needs fewer registers (an H100 decode build: 64 bytes of spills against
# 4.5 KB), so it stays where it can.
BLOCK_POINTERS = hasattr(tl, "make_block_ptr") and tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8)
AOT_HEAD_DIMS = (64, 80, 96, 128, 256)


@triton.jit  # type: ignore[untyped-decorator]
def _attend_tile(  # type: ignore[no-untyped-def]
    state,
    ctx,
    n0,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK_POINTERS: tl.constexpr,
):
    """Keys ``n0 .. n0 + BLOCK_N - 1`` into the running ``state = (m, l, acc, k_tile, v_tile)`` of every row;
    MASKED tiles apply window and bounds. ``ctx`` holds what every tile reads, as :func:`_attention_fwd_kernel`
    packs it.

    With ``BLOCK_POINTERS``, ``k_tile`` and ``v_tile`` are block pointers at key ``n0`` (K transposed,
    ``[BLOCK_D, BLOCK_N]``; V ``[BLOCK_N, BLOCK_D]``), advanced here to the next tile. Without, they point at key
    0 of this KV head and stay there: the tile's pointers are formed here, so that the loops carry no pointer
    tensors. ``d_ok`` marks the real head-dimension columns of a padded ``BLOCK_D``.
    """
    m_i, l_i, acc, k_tile, v_tile = state
    q, offs_n, offs_d, d_ok, strides, visibility, scales = ctx
    stride_ks, stride_kd, stride_vs, stride_vd = strides
    pos, kv_len, window_left, window_right = visibility
    qk_scale, softcap_log2 = scales
    if BLOCK_POINTERS:
        if MASKED:
            k = tl.load(k_tile, boundary_check=(0, 1), padding_option="zero")
            v = tl.load(v_tile, boundary_check=(0, 1), padding_option="zero")
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_tile)
            v = tl.load(v_tile)
        else:
            k = tl.load(k_tile, boundary_check=(0,), padding_option="zero")
            v = tl.load(v_tile, boundary_check=(1,), padding_option="zero")
    else:
        # A 64-bit scalar to key n0 keeps long caches with wide rows clear of int32 overflow.
        k_ptrs = k_tile + n0.to(tl.int64) * stride_ks + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_ks
        v_ptrs = v_tile + n0.to(tl.int64) * stride_vs + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
        if MASKED:
            n_ok = (n0 + offs_n) < kv_len
            if HEAD_DIM == BLOCK_D:
                k = tl.load(k_ptrs, mask=n_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    s = tile_logits(
        tl.dot(q, k), n0 + offs_n, pos, kv_len, qk_scale, softcap_log2, window_left, window_right, USE_SOFTCAP, MASKED
    )
    p, alpha, l_i, m_new = online_softmax(s, m_i, l_i)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    if BLOCK_POINTERS:
        k_tile = tl.advance(k_tile, (0, BLOCK_N))
        v_tile = tl.advance(v_tile, (BLOCK_N, 0))
    return m_new, l_i, acc, k_tile, v_tile


@triton.jit  # type: ignore[untyped-decorator]
def _attention_fwd_kernel(  # type: ignore[no-untyped-def]
    Q,
    K,
    V,
    Out,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    q_len,
    kv_len,
    num_kv_heads,
    group,
    qk_scale,
    softcap_log2,
    window_left,
    window_right,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    PIPELINED: tl.constexpr,
    BLOCK_POINTERS: tl.constexpr,
):
    # Heavier (later, under causal masking) row tiles first, so the last wave is made of short programs.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_kv_heads).to(tl.int64)
    off_hk = pid_bh % num_kv_heads

    n_rows = q_len * group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    q_idx = rows // group
    head = off_hk * group + rows % group
    offset = kv_len - q_len
    pos = q_idx + offset  # position of each row's query among the keys

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)

    q_ptrs = (
        Q + off_b * stride_qb + q_idx[:, None] * stride_qs + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    k_base = K + off_b * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b * stride_vb + off_hk.to(tl.int64) * stride_vh

    lo, hi, full_lo, full_hi = key_span(
        pid_m, n_rows, group, offset, kv_len, window_left, window_right, BLOCK_M, BLOCK_N
    )
    mid_lo, mid_hi = unmasked_span(lo, hi, full_lo, full_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    strides = (stride_ks, stride_kd, stride_vs, stride_vd)
    visibility = (pos, kv_len, window_left, window_right)
    ctx = (q, offs_n, offs_d, d_ok, strides, visibility, (qk_scale, softcap_log2))

    for phase in tl.static_range(3):
        start, end = phase_span(phase, lo, mid_lo, mid_hi, hi)
        if BLOCK_POINTERS:
            k_tile = tl.make_block_ptr(
                k_base, (HEAD_DIM, kv_len), (stride_kd, stride_ks), (0, start), (BLOCK_D, BLOCK_N), (0, 1)
            )
            v_tile = tl.make_block_ptr(
                v_base, (kv_len, HEAD_DIM), (stride_vs, stride_vd), (start, 0), (BLOCK_N, BLOCK_D), (1, 0)
            )
        else:
            k_tile = k_base
            v_tile = v_base
        state = (m_i, l_i, acc, k_tile, v_tile)
        MASKED = phase != 1
        if PIPELINED:
            for n0 in range(start, end, BLOCK_N):
                state = _attend_tile(state, ctx, n0, HEAD_DIM, BLOCK_D, BLOCK_N, USE_SOFTCAP, MASKED, BLOCK_POINTERS)
        else:
            # Triton 3.6's interpreter cannot take runtime range bounds under NumPy 2.4.
            n0 = start
            while n0 < end:
                state = _attend_tile(state, ctx, n0, HEAD_DIM, BLOCK_D, BLOCK_N, USE_SOFTCAP, MASKED, BLOCK_POINTERS)
                n0 += BLOCK_N
        m_i, l_i, acc, k_tile, v_tile = state

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_ptrs = (
        Out + off_b * stride_ob + q_idx[:, None] * stride_os + head[:, None] * stride_oh + offs_d[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def launch_config(q: torch.Tensor, k: torch.Tensor, device: DeviceInfo | None = None) -> TileConfig:
    """The tiles :func:`triton_attention` uses for these inputs on ``device`` (default: the tensors' device)."""
    info = device if device is not None else get_device_info(q.device, refresh_memory=False)
    group = q.shape[2] // k.shape[2]
    return choose_tiles(q.shape[3], q.dtype, info, rows_per_program=q.shape[1] * group)


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """Run the kernel: ``q`` ``[B, Sq, H, D]``, ``k``/``v`` ``[B, Skv, H_kv, D]`` -> ``[B, Sq, H, D]``.

    Inputs are validated by the public function; ``tiles`` overrides :func:`choose_tiles` (benchmarks, tests).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    config = tiles if tiles is not None else launch_config(q, k)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q_len == 0 or batch == 0:
        return out
    left, right = window_bounds(causal, window_size)
    qk_scale, softcap_log2 = kernel_scales(head_dim, softmax_scale, softcap)
    grid = (triton.cdiv(q_len * group, config.block_m), batch * kv_heads)
    _attention_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        q_len,
        kv_len,
        kv_heads,
        group,
        qk_scale,
        softcap_log2,
        left,
        right,
        HEAD_DIM=head_dim,
        BLOCK_D=config.block_d,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        USE_SOFTCAP=softcap is not None,
        PIPELINED=not triton_interpreter_enabled(),
        BLOCK_POINTERS=BLOCK_POINTERS,
        num_warps=config.num_warps,
        enable_fp_fusion=True,
        num_stages=config.num_stages,
    )
    return out


_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_build(head_dim: int, dtype: torch.dtype, device: DeviceInfo, *, decode: bool = False) -> KernelBuild:
    """The build :func:`triton_attention` launches for ``head_dim`` and ``dtype`` on ``device``.

    ``decode=False`` is a prefill (many rows per program), ``decode=True`` one query with 4 heads per KV head.
    """
    from llamatelemetry_core.aot import KernelBuild, kernel_signature

    config = choose_tiles(head_dim, dtype, device, rows_per_program=4 if decode else None)
    types = dict.fromkeys(("Q", "K", "V", "Out"), "*" + _TRITON_DTYPES[dtype])
    # strides, lengths, head counts and window sides: i32
    signature = kernel_signature(_attention_fwd_kernel, {**types, "qk_scale": "fp32", "softcap_log2": "fp32"})
    constexprs: dict[str, int | float | bool | str] = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": config.block_d,
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "USE_SOFTCAP": False,
        "PIPELINED": True,
        "BLOCK_POINTERS": BLOCK_POINTERS,
    }
    # A unit stride of the head dimension is what the launcher sees for contiguous inputs, and Triton
    # specialises on it; the AOT build does the same so that it compiles the kernel that will actually run.
    for tensor in "qkvo":
        signature[f"stride_{tensor}d"] = "constexpr"
        constexprs[f"stride_{tensor}d"] = 1
    kind = "decode" if decode else "prefill"
    name = (
        f"flashattn.fwd[{_TRITON_DTYPES[dtype]},d={head_dim},{kind},"
        f"{config.block_m}x{config.block_n},w{config.num_warps},s{config.num_stages}]"
    )
    return KernelBuild(
        name, _attention_fwd_kernel, signature, constexprs, num_warps=config.num_warps, num_stages=config.num_stages
    )


def aot_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """Every build the library launches on ``device`` in ``dtype``: head dims 64, 80, 96, 128, 256; prefill and
    decode tiles (the ahead-of-time checks, :mod:`llamatelemetry_flashattn.aot`)."""
    for head_dim in AOT_HEAD_DIMS:
        for decode in (False, True):
            yield aot_build(head_dim, dtype, device, decode=decode)
