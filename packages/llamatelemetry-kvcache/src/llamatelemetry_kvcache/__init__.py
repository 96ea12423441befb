"""llamatelemetry-kvcache: Contiguous and paged KV caches.

Documented import path: ``llamatelemetry.inference.kv_cache``.

* :class:`KVCacheConfig`: sizes and dtypes, validated, with the bytes a cache will take;
* :class:`KVCache`: a preallocated ``[batch, seq, kv_heads, head_dim]`` cache per layer, written in place, with
  a graph-safe decode path;
* :class:`PagedKVCache`: per-layer block pools in core's paged layout (``llamatelemetry_core.kv_layout``), a Triton
  write kernel through a slot mapping, copy-on-write forks, ``gather`` back to contiguous tensors;
* :class:`BlockManager`: the pure-Python bookkeeping (core's ``KVBlockManager``): free list, reference counts,
  prefix caching with LRU eviction, statistics;
* int8 (and fp8 e4m3 where the GPU has it) storage with per-token, per-head scales (:mod:`.quant`).
"""

from llamatelemetry_kvcache.__about__ import __version__
from llamatelemetry_kvcache.block_manager import BlockManager, BlockManagerStats
from llamatelemetry_kvcache.config import KVCacheConfig, check_kv_dtype_supported
from llamatelemetry_kvcache.contiguous import KVCache
from llamatelemetry_kvcache.metadata import block_tables_tensor, slot_mapping, slot_mapping_tensor
from llamatelemetry_kvcache.paged import PagedKVCache
from llamatelemetry_kvcache.paged_write import paged_write, paged_write_reference
from llamatelemetry_kvcache.quant import dequantize_kv, quantize_kv

__all__ = [
    "BlockManager",
    "BlockManagerStats",
    "KVCache",
    "KVCacheConfig",
    "PagedKVCache",
    "__version__",
    "block_tables_tensor",
    "check_kv_dtype_supported",
    "dequantize_kv",
    "paged_write",
    "paged_write_reference",
    "quantize_kv",
    "slot_mapping",
    "slot_mapping_tensor",
]
