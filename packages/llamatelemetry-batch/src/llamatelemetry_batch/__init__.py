"""llamatelemetry-batch: Batching and continuous batching for LLM inference.

Documented import path: ``llamatelemetry.inference.batch``.
"""

from llamatelemetry_batch.__about__ import __version__

__all__ = ["__version__"]
