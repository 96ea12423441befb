"""One step's attention metadata, built once on the host and read by every layer.

Two KV stores stand behind the same call, :meth:`StepContext.attend`:

* :class:`ContiguousStep` keeps each sequence's keys and values as one tensor per layer that grows by
  concatenation (what a plain PyTorch generate loop does), and attends sequence by sequence;
* :class:`PagedStep` writes the new keys and values into a paged cache (``llamatelemetry-kvcache``) through a
  slot mapping and reads them back with paged attention (``llamatelemetry-flashattn``), every sequence of the
  step in one call; the layout is core's ``kv_layout``. With the fused kernels on, the rotary positions and that
  write are one launch (:meth:`PagedStep.rotate_and_store`, ``llamatelemetry-triton``'s
  ``triton_rope_paged_write``), and :meth:`~PagedStep.attend` is told the keys are stored already.

Attention itself is causal, aligned to the end (the ``n`` new queries of a sequence are its last ``n`` tokens),
grouped-query, with an optional sliding window of ``window`` tokens (the current one included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_flashattn import flash_attention_forward
from llamatelemetry_kvcache import PagedKVCache
from llamatelemetry_triton import rope_paged_write_refusal, triton_rope_paged_write

__all__ = ["AttentionParams", "ContiguousKVStore", "ContiguousStep", "PagedStep", "StepContext", "attention_plain"]


@dataclass(frozen=True)
class AttentionParams:
    """What every layer's attention shares: scale, window, and whether FlashAttention runs prefill."""

    scale: float
    window: int | None = None
    flash: bool = False

    @property
    def window_size(self) -> tuple[int, int] | None:
        """The window in FlashAttention's ``(left, right)`` convention."""
        return None if self.window is None else (self.window - 1, 0)


def attention_plain(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None
) -> torch.Tensor:
    """Causal attention of one sequence in PyTorch: ``q [n, H, D]`` are the last ``n`` of ``k, v [L, H_kv, D]``."""
    n, heads = q.shape[0], q.shape[1]
    length, kv_heads = k.shape[0], k.shape[1]
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if window is None and n == length:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    elif window is None and n == 1:
        out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
    else:
        pos_q = torch.arange(length - n, length, device=q.device)[:, None]
        pos_k = torch.arange(length, device=q.device)[None, :]
        mask = pos_k <= pos_q
        if window is not None:
            mask &= pos_k > pos_q - window
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams) -> torch.Tensor:
    if params.flash:
        out = flash_attention_forward(
            q[None], k[None], v[None], causal=True, softmax_scale=params.scale, window_size=params.window_size,
            training=False,
        )  # fmt: skip
        return out[0]
    return attention_plain(q, k, v, params.scale, params.window)


class StepContext(Protocol):
    """Per-step metadata with the calls every attention layer makes."""

    def rotate_and_store(
        self,
        layer_idx: int,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> bool:
        """Rotate ``q``, ``k`` in place by ``positions`` (tables ``cos``/``sin``) and store ``k``, ``v`` in one
        call where this store can (``True``); otherwise do nothing and return ``False``."""
        ...

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        params: AttentionParams,
        *,
        stored: bool = False,
    ) -> torch.Tensor:
        """Store the step's ``k, v [tokens, H_kv, D]`` (unless ``stored``: :meth:`rotate_and_store` did) and return
        attention of ``q [tokens, H, D]``."""
        ...


class ContiguousKVStore:
    """Each sequence's keys and values, one growing ``[tokens, H_kv, D]`` tensor per layer."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self._keys: dict[int, list[torch.Tensor | None]] = {}
        self._values: dict[int, list[torch.Tensor | None]] = {}

    def num_tokens(self, seq_id: int) -> int:
        """Tokens stored for ``seq_id`` (0 for an unknown sequence)."""
        keys = self._keys.get(seq_id)
        first = None if keys is None else keys[0]
        return 0 if first is None else int(first.shape[0])

    def append(
        self, seq_id: int, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` to the sequence's layer; return everything stored for that layer."""
        keys = self._keys.setdefault(seq_id, [None] * self.num_layers)
        values = self._values.setdefault(seq_id, [None] * self.num_layers)
        old_k, old_v = keys[layer_idx], values[layer_idx]
        keys[layer_idx] = k if old_k is None else torch.cat((old_k, k))
        values[layer_idx] = v if old_v is None else torch.cat((old_v, v))
        return keys[layer_idx], values[layer_idx]  # type: ignore[return-value]

    def release(self, seq_id: int) -> None:
        """Drop a sequence's tensors."""
        self._keys.pop(seq_id, None)
        self._values.pop(seq_id, None)


class ContiguousStep:
    """A step over the contiguous store: sequences attend one at a time."""

    def __init__(self, store: ContiguousKVStore, seq_ids: list[int], query_lens: list[int]) -> None:
        self.store = store
        self.seq_ids = seq_ids
        self.query_lens = query_lens

    def rotate_and_store(
        self,
        layer_idx: int,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> bool:
        return False  # the store grows by concatenation: nothing to fuse the rotation with

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        params: AttentionParams,
        *,
        stored: bool = False,
    ) -> torch.Tensor:
        if stored:
            raise ConfigurationError("the contiguous store keeps its keys itself; attend() it with stored=False")
        outs = []
        start = 0
        for seq_id, n in zip(self.seq_ids, self.query_lens, strict=True):
            k_all, v_all = self.store.append(seq_id, layer_idx, k[start : start + n], v[start : start + n])
            outs.append(_attend_one(q[start : start + n], k_all, v_all, params))
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class PagedStep:
    """A step over a paged cache: one write and one paged-attention call per layer for the whole batch.

    ``cache`` is written through ``write(layer_idx, keys, values, slot_mapping)`` and read as
    ``layer(layer_idx)`` (a core ``PagedKV``); ``attention`` is ``paged_attention`` of
    ``llamatelemetry-flashattn``. A step in which every sequence starts at position 0 with FlashAttention on runs
    prefill attention over the new keys directly.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        attention: Callable[..., torch.Tensor],
        *,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        max_seqlen_q: int,
        query_lens: list[int] | None = None,
        fresh_prefill: bool = False,
    ) -> None:
        if fresh_prefill and query_lens is None:
            raise ConfigurationError("a fresh-prefill paged step needs the host-side query_lens")
        self.cache = cache
        self.attention = attention
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.seq_lens = seq_lens
        self.cu_seqlens_q = cu_seqlens_q
        self.max_seqlen_q = max_seqlen_q
        self.query_lens = query_lens
        self.fresh_prefill = fresh_prefill
        self._fusable: bool | None = None  # decided at the first layer: every layer has the same dtypes and store

    def rotate_and_store(
        self,
        layer_idx: int,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> bool:
        """One launch for the rotation and the write (``triton_rope_paged_write``) unless the store is one it
        refuses (quantized, or of another dtype), in which case nothing is done and ``False`` returned."""
        store = self.cache.layer(layer_idx)
        if self._fusable is None:
            self._fusable = rope_paged_write_refusal(q, k, v, store) is None
        if not self._fusable:
            return False
        self.cache.prepare_slots(self.slot_mapping)
        triton_rope_paged_write(q, k, v, cos, sin, positions, store, self.slot_mapping)
        return True

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        params: AttentionParams,
        *,
        stored: bool = False,
    ) -> torch.Tensor:
        if not stored:
            self.cache.write(layer_idx, k, v, self.slot_mapping)
        if params.flash and self.fresh_prefill and self.query_lens is not None:
            outs, start = [], 0
            for n in self.query_lens:
                sl = slice(start, start + n)
                outs.append(_attend_one(q[sl], k[sl], v[sl], params))
                start += n
            return outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.attention(
            q, self.cache.layer(layer_idx), self.block_tables, self.seq_lens, self.cu_seqlens_q,
            max_seqlen_q=self.max_seqlen_q, softmax_scale=params.scale, causal=True,
            window_size=params.window_size,
        )  # fmt: skip
