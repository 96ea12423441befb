"""Attention over a paged KV store, written plainly in PyTorch: the specification, CPU path and test oracle.

The store is one layer's :class:`~llamatelemetry_core.kv_layout.PagedKV` (``[num_blocks, page_size, num_kv_heads,
head_dim]``, optionally int8/fp8 with float32 scales per token and head). Sequence ``i`` owns the tokens
``0 .. seq_lens[i] - 1``; token ``t`` lives in block ``block_tables[i, t // page_size]`` at offset
``t % page_size``. Its queries are the packed rows ``cu_seqlens_q[i] .. cu_seqlens_q[i + 1] - 1`` of ``q``, and
they are the sequence's *last* ``n_i`` tokens: query ``r`` sits at position ``p = seq_lens[i] - n_i + r``.

Key ``j`` is visible to that query when ``j < seq_lens[i]`` and ``p - left <= j <= p + right`` (``window_size =
(left, right)``, ``-1`` unbounded; ``causal`` clamps ``right`` to 0), exactly as in
:func:`~llamatelemetry_flashattn.reference.attention_reference` with the queries aligned to the end. Logits are
``(q . k) * softmax_scale``, capped as ``softcap * tanh(s / softcap)`` when asked; a query that sees no key (a
padding sequence with ``seq_lens[i] == 0``) gets zeros. Quantized storage stands for ``stored * scale``.

How it computes: gather every sequence's blocks into a padded contiguous ``[batch, max_blocks * page_size,
num_kv_heads, head_dim]`` tensor (dequantizing on the way), scatter the packed queries into ``[batch,
max_seqlen_q, num_heads, head_dim]``, run masked exact attention in float32 (float64 for float64 queries), and
pack the rows back. Every step is a tensor operation whose sizes come from shapes and ``max_seqlen_q`` alone, so
it reads no device value on the host. Memory is O(batch * heads * max_seqlen_q * max_blocks * page_size).
"""

from __future__ import annotations

import math

import torch

from llamatelemetry_core.kv_layout import PagedKV
from llamatelemetry_flashattn.reference import UNBOUNDED, normalize_window

__all__ = ["dequantized_blocks", "gather_paged_kv", "paged_attention_reference"]


def dequantized_blocks(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``values`` (any stored dtype) as ``dtype``, multiplied by its per-token, per-head ``scale`` if given."""
    if scale is None:
        return values.to(dtype)
    return values.to(dtype) * scale.to(dtype).unsqueeze(-1)


def gather_paged_kv(
    kv: PagedKV, block_tables: torch.Tensor, dtype: torch.dtype, seq_lens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's blocks in order, as contiguous ``[batch, max_blocks * page_size, num_kv_heads, head_dim]``.

    Positions past a sequence's length hold whatever the padding blocks hold: mask them with ``seq_lens``. Given
    ``seq_lens``, block-table entries past each sequence's last block are not followed (block 0 is read
    instead), so padding entries may hold anything. Values are dequantized to ``dtype``.
    """
    batch, max_blocks = block_tables.shape
    _, page_size, kv_heads, head_dim = kv.key_cache.shape
    index = block_tables.long()
    if seq_lens is not None:
        # Entries past a sequence's last block are padding that the layout never dereferences: read block 0.
        used = torch.arange(max_blocks, device=index.device)[None, :] * page_size < seq_lens.long()[:, None]
        index = torch.where(used, index, torch.zeros_like(index))
    index = index.reshape(-1)
    key_scale = None if kv.key_scale is None else kv.key_scale[index]
    value_scale = None if kv.value_scale is None else kv.value_scale[index]
    keys = dequantized_blocks(kv.key_cache[index], key_scale, dtype)
    values = dequantized_blocks(kv.value_cache[index], value_scale, dtype)
    shape = (batch, max_blocks * page_size, kv_heads, head_dim)
    return keys.reshape(shape), values.reshape(shape)


def paged_attention_reference(
    q: torch.Tensor,
    kv: PagedKV,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    max_seqlen_q: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Exact attention of packed queries over a paged store; see the module docstring.

    ``q`` ``[num_tokens, num_heads, head_dim]`` -> ``[num_tokens, num_heads, head_dim]`` in q's dtype. Inputs
    are not validated here: :func:`~llamatelemetry_flashattn.paged_attention` does that.
    """
    num_tokens, heads, head_dim = q.shape
    batch = block_tables.shape[0]
    kv_heads = kv.key_cache.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    device = q.device
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    if num_tokens == 0 or batch == 0:
        return torch.zeros_like(q)

    keys, values = gather_paged_kv(kv, block_tables, compute, seq_lens)  # [B, Lmax, Hkv, D]
    kv_max = keys.shape[1]
    group = heads // kv_heads

    # Packed row t belongs to sequence seq_of[t], as its row_in_seq[t]-th query.
    cu = cu_seqlens_q.long()
    tokens = torch.arange(num_tokens, device=device)
    seq_of = torch.searchsorted(cu[1:], tokens, right=True)
    row_in_seq = tokens - cu[seq_of]
    q_pad = torch.zeros(batch, max_seqlen_q, heads, head_dim, device=device, dtype=compute)
    q_pad[seq_of, row_in_seq] = q.to(compute)

    # [B, Hkv, G, Qmax, D] x [B, Hkv, D, Lmax]: grouped-query heads share their KV head without copies.
    qg = q_pad.view(batch, max_seqlen_q, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    logits = torch.matmul(qg, keys.permute(0, 2, 3, 1).unsqueeze(2)) * scale
    if softcap is not None and softcap > 0:
        logits = torch.tanh(logits / softcap) * softcap

    lens = seq_lens.long()
    q_lens = cu[1:] - cu[:-1]
    key_pos = torch.arange(kv_max, device=device)
    # Slots past a sequence's length may hold anything (uninitialised memory, NaN): zero them, since a masked
    # probability of 0 times NaN would still be NaN.
    stored = (key_pos[None, :] < lens[:, None])[:, :, None, None]
    values = values.masked_fill(~stored, 0.0)
    pos = (lens - q_lens)[:, None] + torch.arange(max_seqlen_q, device=device)[None, :]  # [B, Qmax]
    visible = key_pos[None, None, :] < lens[:, None, None]  # [B, Qmax, Lmax]
    left, right = normalize_window(window_size, causal)
    if left != UNBOUNDED:
        visible = visible & (key_pos[None, None, :] >= pos[:, :, None] - left)
    if right != UNBOUNDED:
        visible = visible & (key_pos[None, None, :] <= pos[:, :, None] + right)
    logits = logits.masked_fill(~visible[:, None, None], float("-inf"))

    # A row that sees no key would be softmax([-inf, ...]) = NaN; it is defined as zero.
    row_max = logits.amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    weights = torch.exp(logits - torch.where(empty, torch.zeros_like(row_max), row_max))
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(empty, torch.ones_like(denom), denom)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3).unsqueeze(2))  # [B, Hkv, G, Qmax, D]
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, max_seqlen_q, heads, head_dim)
    return out[seq_of, row_in_seq].to(q.dtype)
