"""llamatelemetry-kvcache: Contiguous and paged KV caches.

Documented import path: ``llamatelemetry.inference.kv_cache``.
"""

from llamatelemetry_kvcache.__about__ import __version__

__all__ = ["__version__"]
