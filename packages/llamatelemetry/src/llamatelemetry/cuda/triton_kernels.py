"""Triton kernels and a kernel registry (``pip install "llamatelemetry[triton]"``): re-exports llamatelemetry_triton.

Without Triton itself the component still imports: nothing is registered (``list_kernels() == []``) and every
function runs its PyTorch fallback.
"""

from llamatelemetry._components import missing_component
from llamatelemetry._components import reexported as _reexported

try:
    from llamatelemetry_triton import KernelConfig as KernelConfig
    from llamatelemetry_triton import RegisteredKernel as RegisteredKernel
    from llamatelemetry_triton import force_max_block_size as force_max_block_size
    from llamatelemetry_triton import get_kernel as get_kernel
    from llamatelemetry_triton import list_kernels as list_kernels
    from llamatelemetry_triton import register_kernel as register_kernel
    from llamatelemetry_triton import rope_cos_sin as rope_cos_sin
    from llamatelemetry_triton import triton_add as triton_add
    from llamatelemetry_triton import triton_argmax as triton_argmax
    from llamatelemetry_triton import triton_fused_add_layernorm as triton_fused_add_layernorm
    from llamatelemetry_triton import triton_fused_add_rmsnorm as triton_fused_add_rmsnorm
    from llamatelemetry_triton import triton_fused_add_rmsnorm_linear as triton_fused_add_rmsnorm_linear
    from llamatelemetry_triton import triton_geglu as triton_geglu
    from llamatelemetry_triton import triton_layernorm as triton_layernorm
    from llamatelemetry_triton import triton_linear as triton_linear
    from llamatelemetry_triton import triton_rmsnorm as triton_rmsnorm
    from llamatelemetry_triton import triton_rmsnorm_linear as triton_rmsnorm_linear
    from llamatelemetry_triton import triton_rope as triton_rope
    from llamatelemetry_triton import triton_softmax as triton_softmax
    from llamatelemetry_triton import triton_swiglu as triton_swiglu
    from llamatelemetry_triton import triton_swiglu_linear as triton_swiglu_linear
    from llamatelemetry_triton import unregister_kernel as unregister_kernel
except ImportError as exc:
    raise missing_component("triton", exc) from exc

__all__ = _reexported("triton", globals())
del _reexported
