"""A Hugging Face ``transformers`` cache backed by :class:`~llamatelemetry_kvcache.contiguous.KVCache`.

``model.generate(input_ids, past_key_values=TransformersKVCache(cache))`` writes every layer's keys and values
into the preallocated cache instead of growing tensors by concatenation (transformers' ``DynamicCache``), and
produces the same tokens. transformers lays K/V out as ``[batch, heads, seq, head_dim]``; the cache stores
``[batch, seq, heads, head_dim]``, so what a layer receives is a transposed view, no copy. Importing this module
needs transformers (``pip install "llamatelemetry-kvcache[transformers]"``); it follows the layer API of
transformers 5 (``Cache`` holding one layer object per decoder layer), accepting both the older
``get_mask_sizes(cache_position)`` and the newer ``get_mask_sizes(query_length)`` calls.

Rows of the batch are sequences ``0..batch-1`` of the cache; a left-padded batch has one length for every row,
as transformers expects. Beam search and ``num_return_sequences`` reorder or repeat rows in place
(:meth:`KVCache.select_rows`); the batch they produce must fit ``max_batch_size``.

:class:`TransformersPagedKVCache` does the same over a :class:`PagedKVCache`: row ``i`` of the batch is sequence
``i`` of its block manager, each step's K/V go through the paged write, and each layer gets its sequences
gathered back to contiguous tensors (transformers' attention needs them so: the cost grows with the context, so
this class is for checking a paged cache against a model, not for speed; paged attention reads the blocks in place).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_kvcache.contiguous import KVCache
from llamatelemetry_kvcache.paged import PagedKVCache

__all__ = ["TransformersKVCache", "TransformersPagedKVCache"]


# transformers is untyped where installed and Any where not: one ignore covers both (mypy runs in either).
class _KVCacheLayer(CacheLayerMixin):  # type: ignore[misc,no-untyped-call,unused-ignore]
    """One decoder layer's view of the shared :class:`KVCache`."""

    keys: torch.Tensor | None
    values: torch.Tensor | None
    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, cache: KVCache, layer_idx: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call,unused-ignore]
        self.cache = cache
        self.layer_idx = layer_idx
        self.device = cache.config.device
        self.is_initialized = True  # preallocated: nothing to initialise lazily

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[batch, heads, new, head_dim]`` K/V and return the whole cached K/V in the same layout."""
        k, v = self.cache.update(self.layer_idx, key_states.transpose(1, 2), value_states.transpose(1, 2))
        self.keys, self.values = k.transpose(1, 2), v.transpose(1, 2)
        return self.keys, self.values

    def get_seq_length(self, *args: Any) -> int:
        return max(self.cache.lengths[: self.cache.batch_size], default=0)

    def get_mask_sizes(self, query: int | torch.Tensor, *args: Any) -> tuple[int, int]:
        query_length = int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return self.cache.config.max_seq_length

    def get_max_cache_shape(self) -> int:
        return self.cache.config.max_seq_length

    def reset(self) -> None:
        self.cache.clear()
        self.keys = self.values = None

    def crop(self, max_length: int) -> None:
        lengths = self.cache.lengths[: self.cache.batch_size]
        current = max(lengths, default=0)
        keep = current + max_length if max_length < 0 else min(max_length, current)
        self.cache.set_lengths([min(n, keep) for n in lengths])

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        if self.layer_idx == 0:  # the cache's rows are shared by every layer: reorder them once
            self.cache.select_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.layer_idx == 0:
            rows = range(self.cache.batch_size)
            self.cache.select_rows([r for r in rows for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.layer_idx == 0:
            self.cache.select_rows(indices.tolist())

    def offload(self) -> None:
        raise ConfigurationError("a KVCache lives where it was allocated; it cannot be offloaded layer by layer")

    def prefetch(self) -> None:
        return None


class TransformersKVCache(Cache):  # type: ignore[misc,unused-ignore]
    """A transformers ``Cache`` whose layers write into one preallocated :class:`KVCache`.

    ``cache.config.num_layers`` must equal the model's decoder layers, ``num_kv_heads``/``head_dim`` its K/V
    heads and head size, ``dtype`` its dtype. The underlying cache stays reachable as ``.kv_cache``.
    """

    def __init__(self, cache: KVCache) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"expected a llamatelemetry KVCache, got {type(cache).__name__}")
        self.kv_cache = cache
        super().__init__(layers=[_KVCacheLayer(cache, i) for i in range(cache.config.num_layers)])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx >= len(self.layers):
            raise ConfigurationError(
                f"the model wrote layer {layer_idx} but the KVCache has num_layers={len(self.layers)}; build its "
                "KVCacheConfig with the model's num_hidden_layers"
            )
        layer = self.layers[layer_idx]
        assert isinstance(layer, _KVCacheLayer)
        return layer.update(key_states, value_states, *args, **kwargs)


class _PagedLayer(CacheLayerMixin):  # type: ignore[misc,no-untyped-call,unused-ignore]
    """One decoder layer's view of a :class:`TransformersPagedKVCache`."""

    keys: torch.Tensor | None
    values: torch.Tensor | None

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, owner: TransformersPagedKVCache, layer_idx: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call,unused-ignore]
        self.owner = owner
        self.layer_idx = layer_idx
        self.device = owner.paged_cache.config.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = self.owner.update_layer(self.layer_idx, key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self, *args: Any) -> int:
        return self.owner.seq_length

    def get_mask_sizes(self, query: int | torch.Tensor, *args: Any) -> tuple[int, int]:
        query_length = int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)
        return self.owner.seq_length + query_length, 0

    def get_max_length(self) -> int:
        return self.owner.paged_cache.config.max_seq_length

    def get_max_cache_shape(self) -> int:
        return self.owner.paged_cache.config.max_seq_length

    def reset(self) -> None:
        if self.layer_idx == 0:
            self.owner.release()
        self.keys = self.values = None

    def _unsupported(self) -> None:
        raise ConfigurationError(
            "TransformersPagedKVCache keeps one sequence per batch row; reordering, repeating, selecting or cropping "
            "rows is not supported (use TransformersKVCache for beam search or assisted decoding)"
        )

    def crop(self, max_length: int) -> None:
        self._unsupported()

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self._unsupported()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._unsupported()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._unsupported()

    def offload(self) -> None:
        raise ConfigurationError("a PagedKVCache lives where it was allocated; it cannot be offloaded layer by layer")

    def prefetch(self) -> None:
        return None


class TransformersPagedKVCache(Cache):  # type: ignore[misc,unused-ignore]
    """A transformers ``Cache`` whose layers write into a :class:`PagedKVCache` (see the module docstring).

    The token ids are not known to a transformers cache, so the block manager holds placeholders and its prefix
    caching is switched off (a placeholder prefix must never match another sequence's). The paged cache stays
    reachable as ``.paged_cache``.
    """

    def __init__(self, cache: PagedKVCache) -> None:
        if not isinstance(cache, PagedKVCache):
            raise TypeError(f"expected a llamatelemetry PagedKVCache, got {type(cache).__name__}")
        self.paged_cache = cache
        cache.block_manager.enable_prefix_caching = False
        self.seq_length = 0
        self._batch = 0
        self._slots: torch.Tensor | None = None
        self._pending = 0
        super().__init__(layers=[_PagedLayer(self, i) for i in range(cache.config.num_layers)])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx >= len(self.layers):
            raise ConfigurationError(
                f"the model wrote layer {layer_idx} but the PagedKVCache has num_layers={len(self.layers)}; build its "
                "KVCacheConfig with the model's num_hidden_layers"
            )
        return self.update_layer(layer_idx, key_states, value_states)

    def update_layer(
        self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[batch, heads, new, head_dim]`` K/V of one layer; return every cached token in that layout."""
        batch, heads, new, dim = key_states.shape
        cache, manager = self.paged_cache, self.paged_cache.block_manager
        if layer_idx == 0:  # a new step: blocks and slots for the new tokens, shared by every layer
            start = self.seq_length
            placeholder = [0] * new
            if start == 0:
                self.release()
                for row in range(batch):
                    manager.allocate(row, placeholder)
                self._batch = batch
            elif batch != self._batch:
                raise ConfigurationError(f"the batch changed from {self._batch} to {batch} rows in the middle of a run")
            else:
                for row in range(batch):
                    manager.append(row, placeholder)
            self._slots = cache.slot_mapping([(row, start, start + new) for row in range(batch)])
            self._pending = start + new
        assert self._slots is not None
        keys = key_states.transpose(1, 2).reshape(batch * new, heads, dim)
        values = value_states.transpose(1, 2).reshape(batch * new, heads, dim)
        cache.write(layer_idx, keys, values, self._slots)
        gathered = [cache.gather(row, layer_idx) for row in range(batch)]
        k = torch.stack([g[0] for g in gathered]).transpose(1, 2)
        v = torch.stack([g[1] for g in gathered]).transpose(1, 2)
        if layer_idx == len(self.layers) - 1:
            self.seq_length = self._pending
        return k, v

    def release(self) -> None:
        """Free every row's blocks and start over."""
        manager = self.paged_cache.block_manager
        for row in range(self._batch):
            if row in manager:
                manager.free(row)
        self.seq_length = self._batch = self._pending = 0
        self._slots = None
