"""The attention function every backend computes, written plainly in PyTorch: the specification and test oracle.

For a query ``i`` of ``q_len`` queries and a key ``j`` of ``kv_len`` keys, with ``offset = kv_len - q_len`` so that
queries are the *last* ``q_len`` positions of the sequence (decode, chunked prefill; FlashAttention-2's
bottom-right alignment), the query's position is ``p = i + offset`` and key ``j`` is visible when::

    p - left <= j <= p + right        (window_size = (left, right); -1 = unbounded on that side)
    j <= p                            (causal: the same as right = 0)

The logits are ``s = (q . k) * softmax_scale`` (``softmax_scale`` defaults to ``1 / sqrt(head_dim)``), capped as
``softcap * tanh(s / softcap)`` when a softcap is given (Gemma 2). The output row is ``softmax(s) @ v`` over the
visible keys, and **zero** for a query that sees no key at all (when ``q_len > kv_len`` under a mask, or when
``kv_len == 0``), as in FlashAttention. Grouped-query attention: query head ``h`` reads key/value head
``h // (H / H_kv)``. NaN follows IEEE arithmetic through these formulas: a query row holding NaN or an
infinity gives a NaN output row (if it sees a key), a NaN key or value the row sees gives NaN; non-finite keys
and values a query does *not* see are implementation-defined (a fused kernel skipping a masked block never reads
them).

Layout ``[batch, seqlen, heads, head_dim]`` in and out. This path materialises the ``q_len x kv_len`` logits per
(batch, head): O(n^2) memory. It computes in float32 (float64 for float64 inputs) and returns the input dtype.
"""

from __future__ import annotations

import math

import torch

__all__ = ["UNBOUNDED", "attention_reference", "normalize_window", "visibility_mask"]

UNBOUNDED = -1
"""A window side of ``-1`` means no limit on that side (FlashAttention's convention)."""


def normalize_window(window_size: tuple[int, int] | None, causal: bool) -> tuple[int, int]:
    """``(left, right)`` with ``-1`` for unbounded; causal clamps ``right`` to 0. ``None`` is ``(-1, -1)``."""
    left, right = (UNBOUNDED, UNBOUNDED) if window_size is None else window_size
    if causal:
        right = 0 if right == UNBOUNDED else min(right, 0)
    return left, right


def visibility_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    window_size: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Boolean ``[q_len, kv_len]`` mask, True where query ``i`` may see key ``j``; ``None`` when all are visible."""
    left, right = normalize_window(window_size, causal)
    if left == UNBOUNDED and right == UNBOUNDED:
        return None
    pos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    keys = torch.arange(kv_len, device=device)[None, :]
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if left != UNBOUNDED:
        mask &= keys >= pos - left
    if right != UNBOUNDED:
        mask &= keys <= pos + right
    return mask


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Exact attention, see the module docstring. ``q`` ``[B, Sq, H, D]``, ``k``/``v`` ``[B, Skv, H_kv, D]``.

    ``dropout_p > 0`` drops attention probabilities (scaled by ``1 / (1 - p)``) with ``generator``. Inputs are
    not validated here: :func:`~llamatelemetry_flashattn.flash_attention_forward` does that.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    _, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if kv_len == 0:  # no key at all: every query sees none, so every row is zero (causal or not)
        return torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    qt = q.to(compute).transpose(1, 2)  # [B, H, Sq, D]
    kt = k.to(compute).transpose(1, 2)
    vt = v.to(compute).transpose(1, 2)
    if kv_heads != heads:
        kt = kt.repeat_interleave(heads // kv_heads, dim=1)
        vt = vt.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.matmul(qt, kt.transpose(-1, -2)) * scale
    if softcap is not None and softcap > 0:
        logits = torch.tanh(logits / softcap) * softcap
    mask = visibility_mask(q_len, kv_len, causal=causal, window_size=window_size, device=q.device)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    # A row with no visible key would be softmax([-inf, ...]) = NaN; FlashAttention defines it as zero. Emptiness
    # is a matter of the mask, not of the logits: visible keys whose logits are all -inf (an infinite input) give
    # NaN, as IEEE arithmetic does.
    row_max = logits.amax(dim=-1, keepdim=True)
    if mask is None:
        empty = torch.zeros_like(row_max, dtype=torch.bool)
    else:
        empty = ~mask.any(dim=-1).view(q_len, 1).expand_as(row_max)
    weights = torch.exp(logits - torch.where(empty, torch.zeros_like(row_max), row_max))
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(empty, torch.ones_like(denom), denom)
    if dropout_p > 0.0:
        keep = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype) >= dropout_p
        probs = probs * keep / (1.0 - dropout_p)
    out = torch.matmul(probs, vt)  # [B, H, Sq, D]
    return out.transpose(1, 2).to(q.dtype)
