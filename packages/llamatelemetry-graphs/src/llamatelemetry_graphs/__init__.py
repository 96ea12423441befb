"""llamatelemetry-graphs: CUDA graph capture and replay, graph pools and batch-size buckets.

Documented import path: ``llamatelemetry.cuda.graphs``.
"""

from llamatelemetry_graphs.__about__ import __version__

__all__ = ["__version__"]
