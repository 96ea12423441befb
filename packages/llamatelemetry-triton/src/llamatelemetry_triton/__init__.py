"""llamatelemetry-triton: Triton kernels (add, layernorm, softmax, RMSNorm, RoPE, SwiGLU) and a kernel registry.

Documented import path: ``llamatelemetry.cuda.triton_kernels``.
"""

from llamatelemetry_triton.__about__ import __version__

__all__ = ["__version__"]
