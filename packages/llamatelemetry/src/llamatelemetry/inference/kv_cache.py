"""Contiguous and paged KV caches (``pip install "llamatelemetry[kvcache]"``).

Re-exports ``llamatelemetry_kvcache``.
"""

from llamatelemetry._components import missing_component
from llamatelemetry._components import reexported as _reexported

try:
    from llamatelemetry_kvcache import BlockManager as BlockManager
    from llamatelemetry_kvcache import BlockManagerStats as BlockManagerStats
    from llamatelemetry_kvcache import KVCache as KVCache
    from llamatelemetry_kvcache import KVCacheConfig as KVCacheConfig
    from llamatelemetry_kvcache import PagedKVCache as PagedKVCache
    from llamatelemetry_kvcache import block_tables_tensor as block_tables_tensor
    from llamatelemetry_kvcache import dequantize_kv as dequantize_kv
    from llamatelemetry_kvcache import paged_write as paged_write
    from llamatelemetry_kvcache import quantize_kv as quantize_kv
    from llamatelemetry_kvcache import slot_mapping_tensor as slot_mapping_tensor
except ImportError as exc:
    raise missing_component("kvcache", exc) from exc

__all__ = _reexported("kvcache", globals())
del _reexported
