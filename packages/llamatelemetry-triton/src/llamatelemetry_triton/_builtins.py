"""The built-in kernels' registry entries (registered on import when Triton is installed)."""

from __future__ import annotations

from typing import Any

from llamatelemetry_triton._bounds import builtin_bounds
from llamatelemetry_triton.ops import add, glu, norm, rope, softmax
from llamatelemetry_triton.registry import KernelConfig, register_kernel

__all__ = ["builtin_kernels", "register_builtin_kernels"]


def builtin_kernels() -> dict[str, tuple[Any, KernelConfig]]:
    """Name -> (kernel, default config) of every built-in kernel.

    The high-level functions choose their own launch configuration per shape and device
    (:mod:`llamatelemetry_triton.heuristics`); these configs are what ``get_kernel(name).launch`` uses.
    """
    norm_doc = "(X, R, W, B, Y, H, Mean, Rstd, stride_x, stride_r, n_cols, eps, IS_RMS, HAS_RESIDUAL, ...)"
    return {
        "add": (add._add_kernel, KernelConfig("add", 1024, 4, 1, description="out = a + b; (A, B, Out, n)")),
        "layernorm": (
            norm._norm_fwd_kernel,
            KernelConfig("layernorm", 1024, 4, 1, meta={"IS_RMS": False}, description=f"LayerNorm {norm_doc}"),
        ),
        "rmsnorm": (
            norm._norm_fwd_kernel,
            KernelConfig("rmsnorm", 1024, 4, 1, meta={"IS_RMS": True}, description=f"RMSNorm {norm_doc}"),
        ),
        "fused_add_layernorm": (
            norm._norm_fwd_kernel,
            KernelConfig(
                "fused_add_layernorm",
                1024,
                4,
                1,
                meta={"IS_RMS": False, "HAS_RESIDUAL": True},
                description=f"residual add + LayerNorm {norm_doc}",
            ),
        ),
        "fused_add_rmsnorm": (
            norm._norm_fwd_kernel,
            KernelConfig(
                "fused_add_rmsnorm",
                1024,
                4,
                1,
                meta={"IS_RMS": True, "HAS_RESIDUAL": True},
                description=f"residual add + RMSNorm {norm_doc}",
            ),
        ),
        "softmax": (
            softmax._softmax_fwd_kernel,
            KernelConfig("softmax", 1024, 4, 1, description="row softmax, a row per block; (X, Y, stride_x, n_cols)"),
        ),
        "rope": (rope._rope_kernel, KernelConfig("rope", 64, 4, 1, description="rotary embedding of q and k in place")),
        "swiglu": (
            glu._glu_fwd_kernel,
            KernelConfig("swiglu", 1024, 4, 1, meta={"ACTIVATION": 0}, description="silu(gate) * up"),
        ),
        "geglu": (
            glu._glu_fwd_kernel,
            KernelConfig("geglu", 1024, 4, 1, meta={"ACTIVATION": 1}, description="gelu(gate) * up"),
        ),
    }


def register_builtin_kernels() -> None:
    """Register every built-in kernel (replacing earlier entries of the same names), each with its bounds check."""
    bounds = builtin_bounds()
    for name, (kernel, config) in builtin_kernels().items():
        register_kernel(name, kernel, config, replace=True, bounds=bounds[name])
