"""llamatelemetry-triton: Triton kernels (add, layernorm, softmax, RMSNorm, RoPE, RoPE with the paged KV store,
SwiGLU, few-row linear layers with the residual add and RMSNorm or SwiGLU fused in, the arg-max of greedy decoding)
and a kernel registry.

Documented import path: ``llamatelemetry.cuda.triton_kernels``. Every function dispatches through a
:class:`llamatelemetry_core.selection.Operation`: the Triton kernel on CUDA tensors (and on CPU tensors under
``TRITON_INTERPRET=1``), the PyTorch reference otherwise; without Triton the package still imports, nothing is
registered, and every function runs its reference.
"""

from llamatelemetry_triton.__about__ import __version__
from llamatelemetry_triton._compat import HAS_TRITON
from llamatelemetry_triton.heuristics import LaunchConfig, force_max_block_size
from llamatelemetry_triton.ops.add import add_reference, triton_add
from llamatelemetry_triton.ops.argmax import argmax_reference, triton_argmax
from llamatelemetry_triton.ops.glu import geglu_reference, swiglu_reference, triton_geglu, triton_swiglu
from llamatelemetry_triton.ops.linear import (
    fused_add_rmsnorm_linear_reference,
    linear_reference,
    rmsnorm_linear_reference,
    swiglu_linear_reference,
    triton_fused_add_rmsnorm_linear,
    triton_linear,
    triton_rmsnorm_linear,
    triton_swiglu_linear,
)
from llamatelemetry_triton.ops.norm import (
    fused_add_layernorm_reference,
    fused_add_rmsnorm_reference,
    layernorm_reference,
    rmsnorm_reference,
    triton_fused_add_layernorm,
    triton_fused_add_rmsnorm,
    triton_layernorm,
    triton_rmsnorm,
)
from llamatelemetry_triton.ops.rope import rope_cos_sin, rope_reference, triton_rope
from llamatelemetry_triton.ops.rope_paged import (
    rope_paged_write_reference,
    rope_paged_write_refusal,
    triton_rope_paged_write,
)
from llamatelemetry_triton.ops.softmax import softmax_reference, triton_softmax
from llamatelemetry_triton.registry import (
    KernelConfig,
    RegisteredKernel,
    get_kernel,
    list_kernels,
    register_kernel,
    unregister_kernel,
)

if HAS_TRITON:
    from llamatelemetry_triton._builtins import register_builtin_kernels

    register_builtin_kernels()

__all__ = [
    "HAS_TRITON",
    "KernelConfig",
    "LaunchConfig",
    "RegisteredKernel",
    "__version__",
    "add_reference",
    "argmax_reference",
    "force_max_block_size",
    "fused_add_layernorm_reference",
    "fused_add_rmsnorm_linear_reference",
    "fused_add_rmsnorm_reference",
    "geglu_reference",
    "get_kernel",
    "layernorm_reference",
    "linear_reference",
    "list_kernels",
    "register_kernel",
    "rmsnorm_linear_reference",
    "rmsnorm_reference",
    "rope_cos_sin",
    "rope_paged_write_reference",
    "rope_paged_write_refusal",
    "rope_reference",
    "softmax_reference",
    "swiglu_linear_reference",
    "swiglu_reference",
    "triton_add",
    "triton_argmax",
    "triton_fused_add_layernorm",
    "triton_fused_add_rmsnorm",
    "triton_fused_add_rmsnorm_linear",
    "triton_geglu",
    "triton_layernorm",
    "triton_linear",
    "triton_rmsnorm",
    "triton_rmsnorm_linear",
    "triton_rope",
    "triton_rope_paged_write",
    "triton_softmax",
    "triton_swiglu",
    "triton_swiglu_linear",
    "unregister_kernel",
]
