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
  kernel (:mod:`.paged_merge`) merges them. The grid depends on shapes and ``max_seqlen_q`` only, so the launch
  never reads a device value on the host and can be captured in a CUDA graph.
* ``enable_fp_fusion=True`` at launch (fused multiply-adds, the default of every Triton up to 3.9, which the
  AOT builds compile too).
* exp2 with ``log2(e)`` folded into the scale; accumulation in fp32; rows with no visible key are guarded (no
  ``exp(-inf - -inf)``) and return zeros.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from llamatelemetry_core.device import DeviceInfo
from llamatelemetry_core.environment import pdl_capable, programmatic_launch, triton_interpreter_enabled
from llamatelemetry_core.kv_layout import PagedKV
from llamatelemetry_flashattn._attention_tile import kernel_scales, key_span, phase_span, unmasked_span, window_bounds
from llamatelemetry_flashattn._paged_tile import paged_tile
from llamatelemetry_flashattn.paged_merge import merge_splits
from llamatelemetry_flashattn.paged_tiles import PagedLaunch, choose_paged_tiles, paged_launch_config, uses_page_ids

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild

__all__ = [
    "AOT_PAGE_SIZE",
    "aot_build",
    "aot_builds",
    "kv_dtypes_for",
    "triton_paged_attention",
]


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
    USE_PDL: tl.constexpr = False,
):
    if USE_PDL:  # launched as a dependent: wait for the kernel before (it writes q and the cache)
        gdc_wait()
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

    lo, hi, full_lo, full_hi = key_span(
        pid_m, n_rows, group, offset, seq_len, window_left, window_right, BLOCK_M, BLOCK_N
    )
    if SPLIT_KV:
        # This program's part of [lo, hi): whole tiles, as even as they come.
        tiles = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N)
        per_split = tl.cdiv(tiles, num_splits) * BLOCK_N
        lo = lo + split * per_split
        hi = tl.minimum(hi, lo + per_split)
    mid_lo, mid_hi = unmasked_span(lo, hi, full_lo, full_hi)

    block_row = BlockTables + seq.to(tl.int64) * stride_bt
    kv_head_offset = kv_head.to(tl.int64) * stride_kv_head
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    cache = (KCache, VCache, KScale, VScale)
    strides = (stride_kv_block, stride_kv_token, stride_scale_block, stride_scale_token)
    visibility = (pos, seq_len, window_left, window_right)
    ctx = (q, block_row, cache, strides, (kv_head_offset, kv_head), visibility, (qk_scale, softcap_log2))
    state = (m_i, l_i, acc)

    for phase in tl.static_range(3):
        start, end = phase_span(phase, lo, mid_lo, mid_hi, hi)
        MASKED = phase != 1
        if PIPELINED:
            for n0 in range(start, end, BLOCK_N):
                state = paged_tile(
                    state, ctx, n0, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGE_IDS, QUANTIZED, USE_SOFTCAP, MASKED
                )
        else:
            # Triton 3.6's interpreter cannot take runtime range bounds under NumPy 2.4.
            n0 = start
            while n0 < end:
                state = paged_tile(
                    state, ctx, n0, HEAD_DIM, BLOCK_N, PAGE_SIZE, PAGE_IDS, QUANTIZED, USE_SOFTCAP, MASKED
                )
                n0 += BLOCK_N
    m_i, l_i, acc = state
    if USE_PDL:  # the keys are read: the next kernel may start
        gdc_launch_dependents()

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
    pdl = programmatic_launch(q)
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
        USE_PDL=pdl,
        launch_pdl=pdl,
        num_warps=tiles.num_warps,
        enable_fp_fusion=True,  # the default up to Triton 3.9; 3.10 turns it off
        num_stages=tiles.num_stages,
    )
    if splits > 1:
        merge_splits(partial, lse, out, head_dim)
    return out


# --- ahead-of-time builds (``python -m llamatelemetry_core.aot``, through llamatelemetry_flashattn.aot) ---------

AOT_PAGE_SIZE = 16
_AOT_DECODE_ROWS = 4  # one query, four query heads per KV head (Llama-3-8B's grouping)
# (head dim, kind) of the builds in q's own KV dtype: the largest tiles (256), the usual head (128), the smallest
_AOT_PLAIN = (
    (128, "decode"),
    (128, "decode-split"),
    (128, "prefill"),
    (256, "decode"),
    (256, "prefill"),
    (64, "prefill"),
)
_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "i8"}
if hasattr(torch, "float8_e4m3fn"):
    _TRITON_DTYPES[torch.float8_e4m3fn] = "fp8e4nv"


def aot_build(
    head_dim: int, q_dtype: torch.dtype, kv_dtype: torch.dtype, device: DeviceInfo, *, kind: str
) -> KernelBuild:
    """The attention kernel's build for ``kind`` in ``("decode", "decode-split", "prefill")`` on ``device``, with
    pages of ``AOT_PAGE_SIZE`` tokens and the tiles :func:`triton_paged_attention` would launch for a long key range
    (short-range decode tiles, Hopper's at head dim 64, are smaller than the builds here and have none)."""
    from llamatelemetry_core.aot import KernelBuild, kernel_signature

    rows = None if kind == "prefill" else _AOT_DECODE_ROWS
    tiles = choose_paged_tiles(head_dim, q_dtype, kv_dtype, device, rows_per_program=rows)
    split = kind == "decode-split"
    q_ptr, kv_ptr = "*" + _TRITON_DTYPES[q_dtype], "*" + _TRITON_DTYPES[kv_dtype]
    quantized = kv_dtype not in (torch.float16, torch.bfloat16, torch.float32)
    scale_ptr = "*fp32" if quantized else kv_ptr
    partial_ptr = "*fp32" if split else q_ptr
    types = {"Q": q_ptr, "KCache": kv_ptr, "VCache": kv_ptr, "KScale": scale_ptr, "VScale": scale_ptr, "Out": q_ptr}
    types |= dict.fromkeys(("BlockTables", "SeqLens", "CuSeqlensQ"), "*i32")
    types |= {"PartialOut": partial_ptr, "PartialLse": partial_ptr, "qk_scale": "fp32", "softcap_log2": "fp32"}
    signature = kernel_signature(_paged_attention_kernel, types)  # strides, counts and window sides: i32
    constexprs: dict[str, int | float | bool | str] = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": tiles.block_d,
        "BLOCK_M": tiles.block_m,
        "BLOCK_N": tiles.block_n,
        "PAGE_SIZE": AOT_PAGE_SIZE,
        "PAGE_IDS": uses_page_ids(tiles, AOT_PAGE_SIZE),
        "SPLIT_KV": split,
        "QUANTIZED": quantized,
        "USE_SOFTCAP": False,
        "PIPELINED": True,
        "USE_PDL": pdl_capable(device),  # as programmatic_launch launches it
    }
    ids = ",page-ids" if tiles.page_ids else ""
    name = (
        f"flashattn.paged[{_TRITON_DTYPES[q_dtype]},kv={_TRITON_DTYPES[kv_dtype]},d={head_dim},p={AOT_PAGE_SIZE},"
        f"{kind},{tiles.block_m}x{tiles.block_n},w{tiles.num_warps},s{tiles.num_stages}{ids}]"
    )
    return KernelBuild(
        name, _paged_attention_kernel, signature, constexprs, num_warps=tiles.num_warps, num_stages=tiles.num_stages
    )


def kv_dtypes_for(q_dtype: torch.dtype, device: DeviceInfo) -> list[torch.dtype]:
    """KV storage dtypes the kernel runs with ``q_dtype`` on ``device``: q's own, int8, and fp8 where it exists."""
    dtypes = [q_dtype, torch.int8]
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is not None and device.supports_fp8:
        dtypes.append(fp8)
    return dtypes


def aot_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """The builds whose resources bound what :func:`triton_paged_attention` launches on ``device`` with ``dtype``
    queries (page size 16; the merge kernel's are :func:`.paged_merge.aot_builds`).

    Head dim 128 (decode, decode with split-KV, prefill), 256 (decode, prefill: the largest tiles) and 64
    (prefill), KV stored in q's dtype; for fp16 queries also int8 storage and, where the device has fp8, e4m3
    storage at head dim 128 (decode, prefill). Each compile for sm_75 takes tens of seconds, so the list covers
    the extremes rather than every combination.
    """
    for head_dim, kind in _AOT_PLAIN:
        yield aot_build(head_dim, dtype, dtype, device, kind=kind)
    if dtype != torch.float16:
        return
    for kv_dtype in kv_dtypes_for(dtype, device)[1:]:
        for kind in ("decode", "prefill"):
            yield aot_build(128, dtype, kv_dtype, device, kind=kind)
