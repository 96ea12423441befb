"""``PagedKVCache``: per-layer pools of fixed-size blocks in core's paged layout, and the block manager over them.

Each layer's store is a :class:`~llamatelemetry_core.kv_layout.PagedKV` (``[num_blocks, page_size, num_kv_heads,
head_dim]`` K and V, plus float32 ``[num_blocks, page_size, num_kv_heads]`` scales when quantized): exactly what
the paged attention of ``llamatelemetry-flashattn`` reads, with no import between the two packages. Every layer
has the same blocks, so one :class:`~llamatelemetry_kvcache.block_manager.BlockManager` (``.block_manager``)
decides for all of them which blocks a sequence holds. Memory grows with the tokens held, a block at a time,
instead of with ``max_batch_size x max_seq_length`` (vLLM's PagedAttention, Kwon et al., 2023).

A step, as a model runner drives it: the scheduler allocates/appends through ``block_manager``; the runner
builds ``slot_mapping`` (:meth:`PagedKVCache.slot_mapping`) and ``block_tables``/``seq_lens``
(:meth:`PagedKVCache.block_tables`) once, then each layer calls :meth:`PagedKVCache.write` with its new K/V and
hands ``cache.layer(i)`` with the tables to paged attention. :meth:`PagedKVCache.fork` copies the blocks a
copy-on-write fork needs; :meth:`PagedKVCache.gather` reads a sequence back as contiguous tensors (tests, the
reference attention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch

from llamatelemetry_core.device import get_device_info
from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.kv_layout import PagedKV, PagedKVLayout
from llamatelemetry_core.validation import check_positive_int, check_tensor
from llamatelemetry_kvcache.block_manager import BlockManager
from llamatelemetry_kvcache.config import KVCacheConfig, format_bytes
from llamatelemetry_kvcache.metadata import BlockTableBuilder, slot_mapping_tensor
from llamatelemetry_kvcache.paged_write import as_bytes, check_write_inputs, paged_write
from llamatelemetry_kvcache.quant import dequantize_kv

__all__ = ["PagedKVCache"]


class PagedKVCache:
    """Paged K/V stores for every layer of ``config`` and the block manager over them.

    * ``page_size``: tokens per block.
    * ``num_blocks``: blocks per layer; by default enough for ``max_batch_size`` sequences of ``max_seq_length``
      tokens (the same bytes as a :class:`~llamatelemetry_kvcache.contiguous.KVCache`).
    * ``memory_budget``: instead of ``num_blocks``, bytes for all layers (an int) or a fraction in (0, 1] of the
      device's free memory (a float): as many blocks as fit.
    * ``enable_prefix_caching``: keep freed full blocks for reuse by prompts with the same prefix.

    Raises :class:`ConfigurationError` for bad values and :class:`CapacityError` when the blocks do not fit in
    memory (or the budget holds no block).
    """

    def __init__(
        self,
        config: KVCacheConfig,
        page_size: int = 16,
        *,
        num_blocks: int | None = None,
        memory_budget: int | float | None = None,
        enable_prefix_caching: bool = True,
    ) -> None:
        if not isinstance(config, KVCacheConfig):
            raise TypeError(f"expected a KVCacheConfig, got {type(config).__name__}")
        check_positive_int(page_size, "page_size")
        self.config = config
        c = config
        if num_blocks is not None and memory_budget is not None:
            raise ConfigurationError("give num_blocks or memory_budget, not both")
        block_bytes = c.num_layers * page_size * c.bytes_per_token()
        if num_blocks is None:
            if memory_budget is None:
                num_blocks = c.max_batch_size * -(-c.max_seq_length // page_size)
            else:
                num_blocks = _budget_bytes(memory_budget, c) // block_bytes
                if num_blocks < 1:
                    raise CapacityError(
                        f"a memory budget of {format_bytes(_budget_bytes(memory_budget, c))} holds no block of "
                        f"{page_size} tokens ({format_bytes(block_bytes)} over {c.num_layers} layers); raise it"
                    )
        check_positive_int(num_blocks, "num_blocks")
        self.page_layout = PagedKVLayout(num_blocks, page_size, c.num_kv_heads, c.head_dim, c.kv_dtype)
        c.check_fits(self.page_layout.nbytes() * c.num_layers, what="paged KV cache")
        # GPU storage is zeroed once, so a kernel that reads a whole page never meets uninitialised memory.
        # CPU storage stays lazily committed and is zeroed block by block ahead of the first write into it.
        zeroed = c.device.type == "cuda"
        alloc = torch.zeros if zeroed else torch.empty
        layout = self.page_layout
        self._layers: list[PagedKV] = []
        for _ in range(c.num_layers):
            scales = (
                (alloc(layout.scale_shape, dtype=torch.float32, device=c.device) for _ in range(2))
                if layout.quantized
                else iter((None, None))
            )
            key_scale, value_scale = scales
            self._layers.append(
                PagedKV(
                    alloc(layout.kv_shape, dtype=c.kv_dtype, device=c.device),
                    alloc(layout.kv_shape, dtype=c.kv_dtype, device=c.device),
                    key_scale,
                    value_scale,
                )
            )
        self._zeroed_blocks = num_blocks if zeroed else 0
        self.block_manager = BlockManager(num_blocks, page_size, enable_prefix_caching=enable_prefix_caching)
        self.max_blocks_per_seq = -(-c.max_seq_length // page_size)
        self._tables = BlockTableBuilder(
            self.block_manager, self.max_blocks_per_seq, max_rows=max(1024, c.max_batch_size)
        )

    # --- sizes ---------------------------------------------------------------------------------------------------

    @property
    def page_size(self) -> int:
        return self.page_layout.page_size

    @property
    def num_blocks(self) -> int:
        return self.page_layout.num_blocks

    def nbytes(self) -> int:
        """Bytes of every layer's store (K, V and scales)."""
        return self.page_layout.nbytes() * self.config.num_layers

    def layer(self, layer_idx: int) -> PagedKV:
        """The paged store of one layer, in core's layout (what paged attention reads)."""
        self._check_layer(layer_idx)
        return self._layers[layer_idx]

    # --- per-step metadata ---------------------------------------------------------------------------------------

    def block_tables(
        self, seq_ids: Sequence[int], *, max_blocks_per_seq: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block_tables, seq_lens)`` int32 of ``seq_ids`` on the cache's device.

        The table is as wide as the longest sequence's, or ``max_blocks_per_seq`` (fixed shapes for a CUDA graph;
        at most ``ceil(max_seq_length / page_size)``). Built incrementally: only blocks added since the last call
        are copied.
        """
        if max_blocks_per_seq is not None:
            check_positive_int(max_blocks_per_seq, "max_blocks_per_seq")
            if max_blocks_per_seq > self.max_blocks_per_seq:
                raise ConfigurationError(
                    f"expected max_blocks_per_seq <= {self.max_blocks_per_seq} (ceil(max_seq_length / page_size)), "
                    f"got {max_blocks_per_seq}"
                )
        return self._tables.build(seq_ids, device=self.config.device, width=max_blocks_per_seq)

    def slot_mapping(self, spans: Sequence[tuple[int, int, int]], *, pad_to: int | None = None) -> torch.Tensor:
        """int64 slots of the ``(seq_id, start, end)`` token spans written this step, on the cache's device."""
        return slot_mapping_tensor(self.block_manager, spans, pad_to=pad_to, device=self.config.device)

    # --- writing and reading -------------------------------------------------------------------------------------

    def write(
        self,
        layer_idx: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        slot_mapping: torch.Tensor,
        *,
        backend: str | None = None,
    ) -> None:
        """Store ``keys``/``values`` ``[num_tokens, num_kv_heads, head_dim]`` of one layer at ``slot_mapping``.

        ``keys``/``values`` are in ``config.dtype``; quantized storage quantizes them on the way (Triton kernel
        on GPUs and under the interpreter, the PyTorch reference elsewhere; ``backend`` forces one).
        """
        self._check_layer(layer_idx)
        for name, t in (("keys", keys), ("values", values)):
            if check_tensor(t, name).dtype != self.config.dtype:
                raise ConfigurationError(f"expected {name} of dtype {self.config.dtype} (the config's), got {t.dtype}")
        check_tensor(slot_mapping, "slot_mapping")
        if self._zeroed_blocks < self.num_blocks and slot_mapping.numel():
            # Checked before zeroing (CPU storage only): a refused write leaves the store as it was.
            check_write_inputs(keys, values, self._layers[layer_idx], slot_mapping)
            self._zero_blocks_upto(int(slot_mapping.max()) // self.page_size + 1)
        paged_write(keys, values, self._layers[layer_idx], slot_mapping, backend=backend)

    def prepare_slots(self, slot_mapping: torch.Tensor) -> None:
        """Make the blocks ``slot_mapping`` names ready for a kernel that stores into :meth:`layer` itself (RoPE
        fused with the store, say) instead of through :meth:`write`.

        CPU storage is zeroed block by block ahead of its first write, which :meth:`write` does on its way; this
        does the same without writing. A GPU store is zeroed when allocated: nothing to do, and no host sync.
        Slots are not range-checked here (the kernel's own checks do that).
        """
        if self._zeroed_blocks < self.num_blocks and check_tensor(slot_mapping, "slot_mapping").numel():
            self._zero_blocks_upto(int(slot_mapping.max()) // self.page_size + 1)

    def gather(self, seq_id: int, layer_idx: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's K and V as contiguous tensors in ``config.dtype`` (dequantized).

        ``[num_tokens, num_kv_heads, head_dim]`` for one layer, ``[num_layers, num_tokens, num_kv_heads,
        head_dim]`` for all (``layer_idx=None``).
        """
        table = self.block_manager.block_table(seq_id)
        length = self.block_manager.num_tokens(seq_id)
        index = torch.tensor(table, dtype=torch.long, device=self.config.device)
        layers = range(self.config.num_layers) if layer_idx is None else [layer_idx]
        keys, values = [], []
        for i in layers:
            self._check_layer(i)
            k, v = self._gather_layer(self._layers[i], index, length)
            keys.append(k)
            values.append(v)
        if layer_idx is not None:
            return keys[0], values[0]
        return torch.stack(keys), torch.stack(values)

    def _gather_layer(self, store: PagedKV, index: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        shape = (-1, c.num_kv_heads, c.head_dim)
        k = as_bytes(store.key_cache).index_select(0, index).view(c.kv_dtype).reshape(shape)[:length]
        v = as_bytes(store.value_cache).index_select(0, index).view(c.kv_dtype).reshape(shape)[:length]
        if store.key_scale is None or store.value_scale is None:
            return k, v
        ks = store.key_scale.index_select(0, index).reshape(-1, c.num_kv_heads)[:length]
        vs = store.value_scale.index_select(0, index).reshape(-1, c.num_kv_heads)[:length]
        return dequantize_kv(k, ks, c.dtype), dequantize_kv(v, vs, c.dtype)

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy blocks ``source -> destination`` in every layer (K, V and scales): the copy-on-write side."""
        if not copies:
            return
        for src, dst in copies:
            for block in cast("tuple[object, object]", (src, dst)):
                if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < self.num_blocks:
                    raise ConfigurationError(f"expected block indices in [0, {self.num_blocks}), got {block}")
        self._zero_blocks_upto(max(dst for _, dst in copies) + 1)
        device = self.config.device
        src_index = torch.tensor([s for s, _ in copies], dtype=torch.long, device=device)
        dst_index = torch.tensor([d for _, d in copies], dtype=torch.long, device=device)
        for store in self._layers:
            for t in (store.key_cache, store.value_cache, store.key_scale, store.value_scale):
                if t is not None:
                    raw = as_bytes(t)
                    raw.index_copy_(0, dst_index, raw.index_select(0, src_index))

    def fork(self, parent_id: int, child_id: int) -> None:
        """Start ``child_id`` as a copy of ``parent_id``: shared full blocks, a copied last partial block."""
        self.copy_blocks(self.block_manager.fork(parent_id, child_id))

    # --- internals -----------------------------------------------------------------------------------------------

    def _check_layer(self, layer_idx: object) -> None:
        n = self.config.num_layers
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < n:
            raise ConfigurationError(f"expected layer_idx in [0, {n}) (num_layers={n}), got {layer_idx!r}")

    def _zero_blocks_upto(self, end: int) -> None:
        start, end = self._zeroed_blocks, min(end, self.num_blocks)
        if end <= start:
            return
        for store in self._layers:
            for t in (store.key_cache, store.value_cache, store.key_scale, store.value_scale):
                if t is not None:
                    t[start:end].zero_()
        self._zeroed_blocks = end


def _budget_bytes(budget: object, config: KVCacheConfig) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int | float) or not math.isfinite(budget) or budget <= 0:
        raise ConfigurationError(
            f"expected memory_budget as bytes (an int > 0) or a fraction of free memory in (0, 1], got {budget!r}"
        )
    if isinstance(budget, int):
        return budget
    if budget > 1:
        raise ConfigurationError(f"expected a memory_budget fraction in (0, 1], got {budget}; give bytes as an int")
    free = get_device_info(config.device).free_memory_bytes
    if free is None:
        raise ConfigurationError(f"free memory of {config.device} is unknown; give memory_budget in bytes")
    return int(free * budget)
