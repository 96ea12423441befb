"""llamatelemetry-flashattn: FlashAttention with SDPA, Triton and PyTorch fallbacks.

Documented import path: ``llamatelemetry.inference.flash_attn``.
"""

from llamatelemetry_flashattn.__about__ import __version__

__all__ = ["__version__"]
