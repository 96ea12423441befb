"""Paged attention as Triton kernels: FlashAttention-2 over keys and values read through block tables.

What it computes is :func:`~llamatelemetry_flashattn.paged_reference.paged_attention_reference`: packed queries
(``cu_seqlens_q``), each sequence's last tokens, attending to that sequence's cached keys through its block
table, with causal masking aligned to the end, sliding window, softcap and grouped-query heads; int8/fp8 storage
is dequantized in the kernel. One kernel serves decode (one query per sequence) and a chunk of prefill (several),
the shape of flash-attn's ``flash_attn_with_kvcache`` and FlashInfer's paged ``run``.

* A program owns ``BLOCK_M`` rows of one sequence and KV head: the ``G = H / H_kv`` query heads that share the
  KV head are packed into the rows (as in :mod:`.triton_kernel`), so each page is read once per KV head.
* Keys come ``BLOCK_N`` at a time. A key's address is its block's (``block_tables[seq, t // page_size]``) plus
  its offset in the block; when a tile lies inside one page (``page_size % BLOCK_N == 0``) one block number serves
  the whole tile; when it spans whole pages and ``PagedTiles.page_ids`` asks for it, one block number per page
  is loaded and broadcast to the page's keys (else one per key). Addresses are plain pointer arithmetic with
  masks (no block pointers).
* The key range a tile of rows can see (causal end, window start, the sequence's length) is computed first;
  inside it, tiles every row sees completely run without masks, only the boundary tiles build one (three phases
  unrolled at compile time, as in :mod:`.triton_kernel`).
* Quantized storage: a stored value ``x`` stands for ``x * scale`` with one float32 scale per token and head.
  int8 and e4m3 values convert exactly to fp16/bf16, so the dot runs on them as stored and the scales are folded
  in where they are cheapest: the K scale into each logit column, the V scale into each probability column.
* Split-KV (flash-decoding, Dao et al. 2023): with ``SPLIT_KV`` the key range of every program is cut into
  that many parts, run by separate programs that write a normalised partial output and its log-sum-exp; a second
  kernel merges them. The grid depends on shapes and ``max_seqlen_q`` only, so the launch never reads a device
  value on the host and can be captured in a CUDA graph.
* ``enable_fp_fusion=True`` at launch (fused multiply-adds, the default of every Triton up to 3.9, which the
  AOT builds compile too).
* exp2 with ``log2(e)`` folded into the scale; accumulation in fp32; rows with no visible key are guarded (no
  ``exp(-inf - -inf)``) and return zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_core.kv_layout import PagedKV
from llamatelemetry_flashattn._attention_tile import kernel_scales, online_softmax, window_bounds
from llamatelemetry_flashattn.paged_tiles import (
    MERGE_BLOCK_S,
    PagedTiles,
    choose_num_splits,
    choose_paged_tiles,
    uses_page_ids,
)

__all__ = ["PagedLaunch", "merge_warps", "paged_launch_config", "triton_paged_attention"]


@triton.jit  # type: ignore[untyped-decorator]
def _paged_tile(  # type: ignore[no-untyped-def]
    acc,
    l_i,
    m_i,
    q,
    n0,
    pos,
    seq_len,
    block_row,
    KCache,
    VCache,
    KScale,
    VScale,
    kv_head_offset,
    scale_head_offset,
    stride_kv_block,
    stride_kv_token,
    stride_scale_block,
    stride_scale_token,
    qk_scale,
    softcap_log2,
    window_left,
    window_right,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGE_IDS: tl.constexpr,
    QUANTIZED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Keys ``n0 .. n0 + BLOCK_N - 1`` into the running (acc, l, m) of every row; MASKED tiles apply bounds."""
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if PAGE_SIZE % BLOCK_N == 0:
        # The tile lies in one page: one block number for all of it.
        block = tl.load(block_row + n0 // PAGE_SIZE).to(tl.int64)
        slot_block = block + tl.zeros([BLOCK_N], dtype=tl.int64)
        slot_offset = (n0 % PAGE_SIZE) + tl.arange(0, BLOCK_N)
    elif PAGE_IDS:
        # The tile spans BLOCK_N // PAGE_SIZE whole pages: one block number per page, broadcast to its keys.
        pages = n0 // PAGE_SIZE + tl.arange(0, BLOCK_N // PAGE_SIZE)
        if MASKED:
            blocks = tl.load(block_row + pages, mask=pages * PAGE_SIZE < seq_len, other=0).to(tl.int64)
        else:
            blocks = tl.load(block_row + pages).to(tl.int64)
        grid = tl.zeros([BLOCK_N // PAGE_SIZE, PAGE_SIZE], dtype=tl.int32)
        slot_block = tl.reshape(blocks[:, None] + grid, [BLOCK_N])
        slot_offset = tl.reshape(tl.arange(0, PAGE_SIZE)[None, :] + grid, [BLOCK_N])
    elif MASKED:
        slot_block = tl.load(block_row + cols // PAGE_SIZE, mask=cols < seq_len, other=0).to(tl.int64)
        slot_offset = cols % PAGE_SIZE
    else:
        slot_block = tl.load(block_row + cols // PAGE_SIZE).to(tl.int64)
        slot_offset = cols % PAGE_SIZE
    token = slot_block * stride_kv_block + slot_offset * stride_kv_token + kv_head_offset
    k_ptrs = KCache + token[None, :] + offs_d[:, None]  # [BLOCK_D, BLOCK_N]
    v_ptrs = VCache + token[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
    if MASKED:
        col_ok = cols < seq_len
        d_ok = offs_d < HEAD_DIM
        k = tl.load(k_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    elif HEAD_DIM == BLOCK_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        d_ok = offs_d < HEAD_DIM
        k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
    s = tl.dot(q, k.to(q.dtype))
    if QUANTIZED:
        scale_ptrs = slot_block * stride_scale_block + slot_offset * stride_scale_token + scale_head_offset
        if MASKED:
            k_scale = tl.load(KScale + scale_ptrs, mask=cols < seq_len, other=0.0)
            v_scale = tl.load(VScale + scale_ptrs, mask=cols < seq_len, other=0.0)
        else:
            k_scale = tl.load(KScale + scale_ptrs)
            v_scale = tl.load(VScale + scale_ptrs)
        s = s * k_scale[None, :]
    # The logits as _attention_tile.tile_logits forms them, inline (see that module).
    if USE_SOFTCAP:  # noqa: SIM108 (a constexpr branch: the other one is not compiled)
        # softcap * tanh(x), tanh(x) = 2 * sigmoid(2x) - 1, in log2 units for exp2
        s = softcap_log2 * (2.0 * tl.sigmoid(2.0 * (s * qk_scale)) - 1.0)
    else:
        s = s * qk_scale
    if MASKED:
        visible = (
            (cols[None, :] < seq_len)
            & (cols[None, :] >= pos[:, None] - window_left)
            & (cols[None, :] <= pos[:, None] + window_right)
        )
        s = tl.where(visible, s, float("-inf"))
    p, alpha, l_i, m_new = online_softmax(s, m_i, l_i)
    if QUANTIZED:
        p = p * v_scale[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return acc, l_i, m_new


# What changes from one serving step to the next is not specialised on: the split count (with the batch and the
# context), the block table's row stride (the step's widest table) and the split buffers' strides (the step's
# token count). Triton would otherwise compile another kernel the first time one of them is 1 or a multiple of
# 16, in the middle of serving (measured on an H200: 1.1 to 2.4 s steps in a Poisson stream).
_PER_STEP = ["stride_bt", "stride_ps", "stride_ls", "num_splits"]


@triton.jit(do_not_specialize=_PER_STEP)  # type: ignore[untyped-decorator]
def _paged_attention_kernel(  # type: ignore[no-untyped-def]
    Q,
    KCache,
    VCache,
    KScale,
    VScale,
    BlockTables,
    SeqLens,
    CuSeqlensQ,
    Out,
    PartialOut,
    PartialLse,
    stride_qt,
    stride_qh,
    stride_kv_block,
    stride_kv_token,
    stride_kv_head,
    stride_scale_block,
    stride_scale_token,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    num_kv_heads,
    group,
    num_splits,
    qk_scale,
    softcap_log2,
    window_left,
    window_right,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGE_IDS: tl.constexpr,
    SPLIT_KV: tl.constexpr,
    QUANTIZED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    PIPELINED: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    # Heavier (later, under causal masking) row tiles first, so the last wave is made of short programs.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    split = tl.program_id(2)
    seq = pid_bh // num_kv_heads
    kv_head = pid_bh % num_kv_heads

    q_start = tl.load(CuSeqlensQ + seq)
    q_len = tl.load(CuSeqlensQ + seq + 1) - q_start
    seq_len = tl.load(SeqLens + seq)
    n_rows = q_len * group
    if pid_m * BLOCK_M >= n_rows:
        return

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    q_idx = rows // group
    head = kv_head * group + rows % group
    offset = seq_len - q_len
    pos = q_idx + offset  # each row's position among the keys
    token = (q_start + q_idx).to(tl.int64)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Keys seen by some row of this tile: [lo, hi). Keys seen by every row: [full_lo, full_hi).
    pos_first = (pid_m * BLOCK_M) // group + offset
    pos_last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_rows) - 1) // group + offset
    lo = tl.maximum(pos_first - window_left, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(pos_last + window_right + 1, seq_len)
    full_lo = tl.maximum(pos_last - window_left, 0)
    full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(pos_first + window_right + 1, seq_len)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    if SPLIT_KV:
        # This program's part of [lo, hi): whole tiles, as even as they come.
        tiles = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
        per_split = tl.cdiv(tiles, num_splits) * BLOCK_N
        lo = lo + split * per_split
        hi = tl.minimum(hi, lo + per_split)
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)

    block_row = BlockTables + seq.to(tl.int64) * stride_bt
    kv_head_offset = kv_head.to(tl.int64) * stride_kv_head
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for phase in tl.static_range(3):
        # phase 0: [lo, mid_lo) masked; 1: [mid_lo, mid_hi) unmasked; 2: [mid_hi, hi) masked.
        if phase == 0:
            start = lo
            end = mid_lo
        elif phase == 1:
            start = mid_lo
            end = mid_hi
        else:
            start = mid_hi
            end = hi
        if PIPELINED:
            for n0 in range(start, end, BLOCK_N):
                acc, l_i, m_i = _paged_tile(
                    acc,
                    l_i,
                    m_i,
                    q,
                    n0,
                    pos,
                    seq_len,
                    block_row,
                    KCache,
                    VCache,
                    KScale,
                    VScale,
                    kv_head_offset,
                    kv_head,
                    stride_kv_block,
                    stride_kv_token,
                    stride_scale_block,
                    stride_scale_token,
                    qk_scale,
                    softcap_log2,
                    window_left,
                    window_right,
                    HEAD_DIM,
                    BLOCK_D,
                    BLOCK_N,
                    PAGE_SIZE,
                    PAGE_IDS,
                    QUANTIZED,
                    USE_SOFTCAP,
                    phase != 1,
                )
        else:
            # Triton 3.6's interpreter cannot take runtime range bounds under NumPy 2.4.
            n0 = start
            while n0 < end:
                acc, l_i, m_i = _paged_tile(
                    acc,
                    l_i,
                    m_i,
                    q,
                    n0,
                    pos,
                    seq_len,
                    block_row,
                    KCache,
                    VCache,
                    KScale,
                    VScale,
                    kv_head_offset,
                    kv_head,
                    stride_kv_block,
                    stride_kv_token,
                    stride_scale_block,
                    stride_scale_token,
                    qk_scale,
                    softcap_log2,
                    window_left,
                    window_right,
                    HEAD_DIM,
                    BLOCK_D,
                    BLOCK_N,
                    PAGE_SIZE,
                    PAGE_IDS,
                    QUANTIZED,
                    USE_SOFTCAP,
                    phase != 1,
                )
                n0 += BLOCK_N

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    mask = row_ok[:, None] & d_ok[None, :]
    if not SPLIT_KV:
        o_ptrs = Out + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)
    else:
        p_ptrs = PartialOut + split * stride_ps + token[:, None] * stride_pt + head[:, None] * stride_ph
        tl.store(p_ptrs + offs_d[None, :], out, mask=mask)
        # log2-sum-exp2 of the row's logits in this part; -inf when the part holds no visible key.
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        tl.store(PartialLse + split * stride_ls + token * stride_lt + head, lse, mask=row_ok)


@triton.jit(do_not_specialize=["stride_ps", "stride_ls", "num_splits"])  # type: ignore[untyped-decorator]
def _merge_splits_kernel(  # type: ignore[no-untyped-def]
    PartialOut,
    PartialLse,
    Out,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    stride_ot,
    stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One (token, head): the partial outputs weighted by exp2(lse_s - max lse), normalised; zeros if none saw a key."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    lse = tl.load(PartialLse + splits * stride_ls + token * stride_lt + head, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.math.exp2(lse - top_safe)  # 0 for parts without keys
    total = tl.sum(weight, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    ptrs = PartialOut + splits[:, None] * stride_ps + token * stride_pt + head * stride_ph + offs_d[None, :]
    parts = tl.load(ptrs, mask=split_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + token * stride_ot + head * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)


@dataclass(frozen=True)
class PagedLaunch:
    """Tiles and split count of one launch (what :func:`paged_launch_config` chooses)."""

    tiles: PagedTiles
    num_splits: int


def paged_launch_config(
    q: torch.Tensor,
    kv: PagedKV,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    device: DeviceInfo | None = None,
) -> PagedLaunch:
    """What :func:`triton_paged_attention` launches for these inputs on ``device`` (default: q's device)."""
    info = device if device is not None else get_device_info(q.device, refresh_memory=False)
    _, heads, head_dim = q.shape
    _, page_size, kv_heads, _ = kv.key_cache.shape
    group = heads // kv_heads
    rows = max(1, max_seqlen_q) * group
    tiles = choose_paged_tiles(head_dim, q.dtype, kv.key_cache.dtype, info, rows_per_program=rows)
    programs = block_tables.shape[0] * kv_heads * triton.cdiv(rows, tiles.block_m)
    splits = choose_num_splits(programs, block_tables.shape[1] * page_size, info)
    return PagedLaunch(tiles, splits)


def merge_warps(block_d: int) -> int:
    """Warps of the split-KV merge kernel for a head of ``block_d`` columns."""
    return 4 if block_d >= 128 else 2


def triton_paged_attention(
    q: torch.Tensor,
    kv: PagedKV,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    max_seqlen_q: int,
    causal: bool,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    launch: PagedLaunch | None = None,
) -> torch.Tensor:
    """Run the kernels: ``q`` ``[num_tokens, H, D]`` -> ``[num_tokens, H, D]`` (written into ``out`` if given).

    Inputs are validated by the public function; ``launch`` overrides :func:`paged_launch_config` (tests,
    benchmark sweeps). Nothing here reads a device value on the host.
    """
    num_tokens, heads, head_dim = q.shape
    _, page_size, kv_heads, _ = kv.key_cache.shape
    batch = block_tables.shape[0]
    group = heads // kv_heads
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    config = launch if launch is not None else paged_launch_config(q, kv, block_tables, max_seqlen_q)
    tiles, splits = config.tiles, config.num_splits
    if num_tokens == 0 or batch == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()  # the kernel reads each head's vector as one contiguous run
    left, right = window_bounds(causal, window_size)
    qk_scale, softcap_log2 = kernel_scales(head_dim, softmax_scale, softcap)
    quantized = kv.key_scale is not None
    key_scale = kv.key_scale if kv.key_scale is not None else kv.key_cache
    value_scale = kv.value_scale if kv.value_scale is not None else kv.value_cache
    scale_strides = kv.key_scale.stride()[:2] if kv.key_scale is not None else (0, 0)
    if splits > 1:
        partial = torch.empty(splits, num_tokens, heads, head_dim, device=q.device, dtype=torch.float32)
        lse = torch.empty(splits, num_tokens, heads, device=q.device, dtype=torch.float32)
    else:
        partial, lse = out, out  # never dereferenced without SPLIT_KV
    row_tiles = triton.cdiv(min(max_seqlen_q, num_tokens) * group, tiles.block_m)
    grid = (batch * kv_heads, row_tiles, splits)
    _paged_attention_kernel[grid](
        q,
        kv.key_cache,
        kv.value_cache,
        key_scale,
        value_scale,
        block_tables,
        seq_lens,
        cu_seqlens_q,
        out,
        partial,
        lse,
        q.stride(0),
        q.stride(1),
        kv.key_cache.stride(0),
        kv.key_cache.stride(1),
        kv.key_cache.stride(2),
        *scale_strides,
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        kv_heads,
        group,
        splits,
        qk_scale,
        softcap_log2,
        left,
        right,
        HEAD_DIM=head_dim,
        BLOCK_D=tiles.block_d,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        PAGE_SIZE=page_size,
        PAGE_IDS=uses_page_ids(tiles, page_size),
        SPLIT_KV=splits > 1,
        QUANTIZED=quantized,
        USE_SOFTCAP=softcap is not None,
        PIPELINED=not triton_interpreter_enabled(),
        num_warps=tiles.num_warps,
        enable_fp_fusion=True,  # the default up to Triton 3.9; 3.10 turns it off
        num_stages=tiles.num_stages,
    )
    if splits > 1:
        _merge_splits_kernel[(num_tokens, heads)](
            partial,
            lse,
            out,
            partial.stride(0),
            partial.stride(1),
            partial.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            splits,
            HEAD_DIM=head_dim,
            BLOCK_D=tiles.block_d,
            # One width for every split count (masked lanes load nothing): a kernel per power of two would be
            # compiled whenever a longer context first asks for more splits.
            BLOCK_S=MERGE_BLOCK_S,
            num_warps=merge_warps(tiles.block_d),
            enable_fp_fusion=True,  # the default up to Triton 3.9; 3.10 turns it off
        )
    return out
