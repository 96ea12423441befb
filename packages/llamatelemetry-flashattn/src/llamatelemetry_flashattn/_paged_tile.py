"""One tile of keys of the paged attention kernel (:mod:`.paged_kernel`): addresses through the block table,
the loads (dequantized when stored as int8/fp8), the logits and the online-softmax update.

A key's address is its block's (``block_row[t // PAGE_SIZE]``) plus its offset in the block: one block number
for the whole tile when the tile lies inside one page, one per page when ``PAGE_IDS`` asks for it and the tile
spans whole pages, else one per key. The kernel calls this from two loops (compiled and interpreted), so the
step is written once; Triton inlines it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llamatelemetry_flashattn._attention_tile import online_softmax, tile_logits

__all__ = ["paged_tile"]


@triton.jit  # type: ignore[untyped-decorator]
def paged_tile(  # type: ignore[no-untyped-def]
    state,
    ctx,
    n0,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PAGE_IDS: tl.constexpr,
    QUANTIZED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Keys ``n0 .. n0 + BLOCK_N - 1`` into the running ``state = (m, l, acc)`` of every row; MASKED tiles apply
    bounds. ``ctx`` holds what every tile reads, as the kernel packs it: ``(q, block_row, (KCache, VCache, KScale,
    VScale), (stride_kv_block, stride_kv_token, stride_scale_block, stride_scale_token), (kv_head_offset,
    scale_head_offset), (pos, seq_len, window_left, window_right), (qk_scale, softcap_log2))``."""
    m_i, l_i, acc = state
    q, block_row, cache, strides, head_offsets, visibility, scales = ctx
    KCache, VCache, KScale, VScale = cache
    stride_kv_block, stride_kv_token, stride_scale_block, stride_scale_token = strides
    kv_head_offset, scale_head_offset = head_offsets
    pos, seq_len, window_left, window_right = visibility
    qk_scale, softcap_log2 = scales
    BLOCK_D: tl.constexpr = q.shape[1]  # q is [BLOCK_M, BLOCK_D]
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
    s = tile_logits(s, cols, pos, seq_len, qk_scale, softcap_log2, window_left, window_right, USE_SOFTCAP, MASKED)
    p, alpha, l_i, m_new = online_softmax(s, m_i, l_i)
    if QUANTIZED:
        p = p * v_scale[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc
