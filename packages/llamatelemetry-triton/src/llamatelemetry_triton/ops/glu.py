"""Gated linear unit activations of transformer MLPs: ``act(gate) * up``, fused into one pass.

Shazeer, "GLU Variants Improve Transformer" (2020)::

    SwiGLU   y = silu(gate) * up           silu(g) = g * sigmoid(g)        (Llama, Mistral, Qwen)
    GeGLU    y = gelu(gate) * up           exact (erf) or tanh-approximated  (Gemma, T5 v1.1)

``gate`` and ``up`` are ``[..., N]`` of any strides, or a single ``[..., 2N]`` tensor (the output of a fused
gate/up projection) split in halves, gate first. Computed in fp32, returned in the gate's dtype. One program
per (row, block of up to 8 KiB); the backward kernel recomputes the activation instead of storing it::

    d_up   = dy * act(gate)
    d_gate = dy * up * act'(gate)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import format_shape
from llamatelemetry_triton._aot_shapes import HIDDEN_SIZES, TYPE_NAMES, kernel_build
from llamatelemetry_triton._bounds import rowwise
from llamatelemetry_triton._compat import tl, triton
from llamatelemetry_triton._dispatch import (
    TRITON_DTYPES,
    TritonOperation,
    check_float_tensor,
    compute_dtype,
    cuda_in_triton_dtypes,
    described,
    device_info,
    needs_autograd,
    run_op,
    triton_errors,
)
from llamatelemetry_triton._launch import on_device, rows_of
from llamatelemetry_triton.heuristics import current_max_block_size, glu_config
from llamatelemetry_triton.registry import BuiltinEntry, KernelConfig

if TYPE_CHECKING:
    from collections.abc import Iterator

    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = ["GLUFunction", "geglu_reference", "swiglu_reference", "triton_geglu", "triton_swiglu"]

_SILU, _GELU, _GELU_TANH = 0, 1, 2
_APPROXIMATIONS = {"none": _GELU, "tanh": _GELU_TANH}


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` in fp32 (fp64 for fp64 inputs), returned in ``gate``'s dtype."""
    compute = compute_dtype(gate)
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def geglu_reference(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate) * up`` in fp32 or fp64 (``approximate`` as in ``F.gelu``), returned in ``gate``'s dtype.

    The exact GELU is written out as ``0.5 x (1 + erf(x / sqrt 2))``: ``F.gelu`` on CPU float32 returns NaN for
    ``+inf`` (float64 and the formula give ``+inf``).
    """
    compute = compute_dtype(gate)
    g = gate.to(compute)
    if approximate == "none":
        activated = 0.5 * g * (1.0 + torch.erf(g * math.sqrt(0.5)))
    else:
        activated = F.gelu(g, approximate=approximate)
    return (activated * up.to(compute)).to(gate.dtype)


@triton.jit  # type: ignore[untyped-decorator]
def _row_block(n_cols, BLOCK_SIZE: tl.constexpr):  # type: ignore[no-untyped-def]
    """This program's row (int64, so that row offsets cannot overflow) and block of columns, with its mask."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    return row, cols, cols < n_cols


@triton.jit
def _load_fp32(pointers, mask):  # type: ignore[no-untyped-def]
    return tl.load(pointers, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gelu_tanh_argument(g):  # type: ignore[no-untyped-def]
    """``sqrt(2/pi) (g + 0.044715 g^3)``, whose tanh the tanh-approximated GELU takes (as ``2 sigmoid(2x) - 1``)."""
    return 0.7978845608028654 * (g + 0.044715 * g * g * g)


@triton.jit  # type: ignore[untyped-decorator]
def _glu_fwd_kernel(  # type: ignore[no-untyped-def]
    G, U, Y, stride_g, stride_u, n_cols, ACTIVATION: tl.constexpr, BLOCK_SIZE: tl.constexpr
):
    row, cols, mask = _row_block(n_cols, BLOCK_SIZE)
    g = _load_fp32(G + row * stride_g + cols, mask)
    u = _load_fp32(U + row * stride_u + cols, mask)
    if ACTIVATION == 0:
        a = g * tl.sigmoid(g)
    elif ACTIVATION == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:
        inner = _gelu_tanh_argument(g)
        a = 0.5 * g * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    tl.store(Y + row * n_cols + cols, (a * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit  # type: ignore[untyped-decorator]
def _glu_bwd_kernel(  # type: ignore[no-untyped-def]
    DY, G, U, DG, DU, stride_dy, stride_g, stride_u, n_cols, ACTIVATION: tl.constexpr, BLOCK_SIZE: tl.constexpr
):
    row, cols, mask = _row_block(n_cols, BLOCK_SIZE)
    dy = _load_fp32(DY + row * stride_dy + cols, mask)
    g = _load_fp32(G + row * stride_g + cols, mask)
    u = _load_fp32(U + row * stride_u + cols, mask)
    if ACTIVATION == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    elif ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    else:
        inner = _gelu_tanh_argument(g)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    tl.store(DG + row * n_cols + cols, (dy * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * n_cols + cols, (dy * a).to(DU.dtype.element_ty), mask=mask)


def _launch(kernel: Any, gate: torch.Tensor, n_rows: int, *arguments: object, activation: int) -> None:
    """Launch ``kernel`` on ``arguments`` and the row length, one program per row of ``gate`` and column block."""
    n_cols = gate.shape[-1]
    config = glu_config(n_cols, gate.dtype, device_info(gate.device), max_block=current_max_block_size())
    with on_device(gate):
        kernel[(n_rows, triton.cdiv(n_cols, config.block_size))](
            *arguments,
            n_cols,
            ACTIVATION=activation,
            BLOCK_SIZE=config.block_size,
            num_warps=config.num_warps,
            enable_fp_fusion=True,
        )


def _glu_forward(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel() == 0:
        return y
    (g2, n_rows, stride_g), (u2, _, stride_u) = rows_of(gate), rows_of(up)
    _launch(_glu_fwd_kernel, gate, n_rows, g2, u2, y, stride_g, stride_u, activation=activation)
    return y


def _glu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel() == 0:
        return dgate, dup
    (dy2, _, stride_dy), (g2, n_rows, stride_g), (u2, _, stride_u) = rows_of(dy), rows_of(gate), rows_of(up)
    _launch(
        _glu_bwd_kernel, gate, n_rows, dy2, g2, u2, dgate, dup, stride_dy, stride_g, stride_u, activation=activation
    )
    return dgate, dup


@torch.library.custom_op("llamatelemetry::triton_glu_fwd", mutates_args=())
def _glu_fwd_op(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    return _glu_forward(gate, up, activation)


@_glu_fwd_op.register_fake
def _glu_fwd_fake(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("llamatelemetry::triton_glu_bwd", mutates_args=())
def _glu_bwd_op(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return _glu_backward(dy, gate, up, activation)


@_glu_bwd_op.register_fake
def _glu_bwd_fake(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, activation: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
        torch.empty(up.shape, dtype=up.dtype, device=up.device),
    )


class GLUFunction(torch.autograd.Function):
    """``act(gate) * up`` (``activation``: 0 SiLU, 1 GELU, 2 tanh-GELU) with a fused backward."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
        y: torch.Tensor = run_op(torch.ops.llamatelemetry.triton_glu_fwd, _glu_forward, gate, up, activation)
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        dgate, dup = run_op(torch.ops.llamatelemetry.triton_glu_bwd, _glu_backward, dy, gate, up, ctx.activation)
        return dgate, dup, None


def _split(gate: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    check_float_tensor(gate, "gate")
    if gate.dim() == 0:
        raise ConfigurationError("expected gate with at least one dimension, got a 0-d tensor")
    if up is None:
        if gate.shape[-1] % 2:
            raise ConfigurationError(
                f"expected a fused [..., 2N] gate/up tensor with an even last dimension, got {format_shape(gate.shape)}"
            )
        first, second = gate.chunk(2, dim=-1)
        return first, second
    check_float_tensor(up, "up")
    if up.shape != gate.shape or up.device != gate.device:
        raise ConfigurationError(
            f"expected up of gate's shape {format_shape(gate.shape)} on {gate.device}, "
            f"got {format_shape(up.shape)} on {up.device}"
        )
    return gate, up


def _unsupported(up: torch.Tensor) -> str | None:
    return None if up.dtype in TRITON_DTYPES else f"up is {up.dtype}; the kernel takes float16, bfloat16, float32"


def _glu_apply(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    if needs_autograd(gate, up):
        y: torch.Tensor = GLUFunction.apply(gate, up, activation)  # type: ignore[no-untyped-call]
        return y
    out: torch.Tensor = run_op(torch.ops.llamatelemetry.triton_glu_fwd, _glu_forward, gate, up, activation)
    return out


@triton_errors("swiglu")
def _swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _glu_apply(gate, up, _SILU)


@triton_errors("geglu")
def _geglu_triton(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    return _glu_apply(gate, up, _APPROXIMATIONS[approximate])


SWIGLU = TritonOperation(
    "triton.swiglu",
    swiglu_reference,
    _swiglu_triton,
    describe=lambda g, u: described(g, u, triton_unsupported=_unsupported(u)),
    traceable=lambda g, u, *_: cuda_in_triton_dtypes(g, u),
    aliases=("swiglu",),
)
GEGLU = TritonOperation(
    "triton.geglu",
    geglu_reference,
    _geglu_triton,
    describe=lambda g, u, approximate: described(g, u, triton_unsupported=_unsupported(u)),
    traceable=lambda g, u, *_: cuda_in_triton_dtypes(g, u),
    aliases=("geglu",),
)


def triton_swiglu(gate: torch.Tensor, up: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """``silu(gate) * up``; with ``up=None``, ``gate`` is a fused ``[..., 2N]`` tensor split as ``(gate, up)``.

    Returns ``[..., N]`` in the gate's dtype; differentiable in both.
    """
    g, u = _split(gate, up)
    return SWIGLU(g, u, backend=backend)  # type: ignore[no-any-return]


def triton_geglu(
    gate: torch.Tensor, up: torch.Tensor | None = None, *, approximate: str = "none", backend: str | None = None
) -> torch.Tensor:
    """``gelu(gate) * up`` (``approximate="none"`` for erf, ``"tanh"`` for the tanh form, as in ``F.gelu``).

    ``up=None`` splits a fused ``[..., 2N]`` gate; returns ``[..., N]`` in the gate's dtype; differentiable.
    """
    if approximate not in _APPROXIMATIONS:
        raise ConfigurationError(f"expected approximate to be 'none' or 'tanh' (as in F.gelu), got {approximate!r}")
    g, u = _split(gate, up)
    return GEGLU(g, u, approximate, backend=backend)  # type: ignore[no-any-return]


# --- ahead-of-time builds ----------------------------------------------------------------------------------


def aot_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """Every build of this module's kernels as they would be launched on ``device`` in ``dtype``, for the
    representative shapes (the ahead-of-time checks, :mod:`llamatelemetry_triton.aot`)."""
    t = TYPE_NAMES[dtype]
    types = dict.fromkeys(("G", "U", "Y", "DY", "DG", "DU"), f"*{t}")
    for hidden in HIDDEN_SIZES:
        config = glu_config(hidden, dtype, device)
        for name, activation in (("swiglu", 0), ("geglu", 1), ("geglu_tanh", 2)):
            for kernel, direction in ((_glu_fwd_kernel, "fwd"), (_glu_bwd_kernel, "bwd")):
                yield kernel_build(
                    f"triton.{name}_{direction}[{t},BLOCK={config.block_size}]",
                    kernel,
                    types,
                    {"ACTIVATION": activation, "BLOCK_SIZE": config.block_size},
                    num_warps=config.num_warps,
                )


# --- registry entries ---------------------------------------------------------------------------------------


def registry_entries() -> dict[str, BuiltinEntry]:
    """This module's kernels in the registry (``get_kernel(name)``): kernel, default launch config, bounds check."""
    variants = {"swiglu": (0, "silu(gate) * up"), "geglu": (1, "gelu(gate) * up")}
    return {
        name: (
            _glu_fwd_kernel,
            KernelConfig(name, 1024, 4, 1, meta={"ACTIVATION": activation}, description=what),
            rowwise(name, (("G", "stride_g"), ("U", "stride_u")), ("Y",)),
        )
        for name, (activation, what) in variants.items()
    }
