"""llamatelemetry: GPU inference optimizations for PyTorch, from a Tesla T4 to Hopper, with CPU fallbacks.

The documented modules live under :mod:`llamatelemetry.cuda` (``graphs``, ``triton_kernels``,
``tensor_core``) and :mod:`llamatelemetry.inference` (``flash_attn``, ``kv_cache``, ``batch``). Each re-exports
one separately installed component; importing one whose component is missing raises ``ImportError`` naming the
extra to install. ``llamatelemetry doctor`` reports what this machine can run.
"""

from llamatelemetry.__about__ import __version__

__all__ = ["__version__"]
