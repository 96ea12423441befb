"""The built-in kernels' registry entries (registered on import when Triton is installed): each operation's
module lists its own (``registry_entries``)."""

from __future__ import annotations

from llamatelemetry_triton.ops import add, argmax, glu, linear, norm, rope, rope_paged, softmax
from llamatelemetry_triton.registry import register_kernel

__all__ = ["register_builtin_kernels"]

_OPERATION_MODULES = (add, norm, softmax, argmax, rope, glu, rope_paged, linear)


def register_builtin_kernels() -> None:
    """Register every built-in kernel (replacing earlier entries of the same names), each with its bounds check.

    The high-level functions choose their own launch configuration per shape and device
    (:mod:`llamatelemetry_triton.heuristics`); the configs registered here are what ``get_kernel(name).launch``
    uses."""
    for module in _OPERATION_MODULES:
        for name, (kernel, config, bounds) in module.registry_entries().items():
            register_kernel(name, kernel, config, replace=True, bounds=bounds)
