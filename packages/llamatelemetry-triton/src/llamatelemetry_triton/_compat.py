"""Triton, when it imports; a stand-in that lets the kernel modules import when it does not.

Kernel modules write ``@triton.jit`` at module level. Without Triton the stand-in's ``jit`` returns a placeholder
that raises if anyone tries to launch it, so the references, the public functions and their PyTorch fallbacks
stay importable and usable (the ``cpu-fallback`` test matrix).
"""

from __future__ import annotations

from typing import Any

from llamatelemetry_core.toolchain import TRITON_INSTALL

__all__ = [
    "HAS_TRITON",
    "TRITON_IMPORT_ERROR",
    "TritonMissingError",
    "gdc_launch_dependents",
    "gdc_wait",
    "tl",
    "triton",
]


class TritonMissingError(ImportError):
    """A Triton kernel was launched but Triton is not installed."""


class _MissingKernel:
    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __getitem__(self, grid: object) -> Any:
        raise TritonMissingError(
            f"Triton kernel {self.__name__} cannot run: Triton is not installed ({TRITON_IMPORT_ERROR}); "
            f"install it with: {TRITON_INSTALL}"
        )


class _MissingTriton:
    """The part of ``triton`` and ``triton.language`` that module-level kernel definitions touch."""

    constexpr = object

    @staticmethod
    def jit(fn: Any = None, **_: Any) -> Any:
        if fn is None:
            return _MissingKernel
        return _MissingKernel(fn)

    def __getattr__(self, name: str) -> Any:
        raise TritonMissingError(f"triton.{name} is unavailable: Triton is not installed ({TRITON_IMPORT_ERROR})")


triton: Any
tl: Any
# Grid dependency control (programmatic dependent launch, sm_90 on), called by kernels under a USE_PDL constexpr.
gdc_wait: Any
gdc_launch_dependents: Any
TRITON_IMPORT_ERROR: str | None
try:
    import triton as _triton
    import triton.language as _tl
    from triton.language.extra.cuda import gdc_launch_dependents as _gdc_launch_dependents
    from triton.language.extra.cuda import gdc_wait as _gdc_wait
except ImportError as exc:
    triton = tl = _MissingTriton()
    gdc_wait = gdc_launch_dependents = None
    TRITON_IMPORT_ERROR = str(exc)
else:
    triton, tl = _triton, _tl
    gdc_wait, gdc_launch_dependents = _gdc_wait, _gdc_launch_dependents
    TRITON_IMPORT_ERROR = None

HAS_TRITON: bool = TRITON_IMPORT_ERROR is None
