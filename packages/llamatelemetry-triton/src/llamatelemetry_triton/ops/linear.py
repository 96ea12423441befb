"""Linear layers for a few rows (decode), optionally with the residual add and RMSNorm before them fused in.

For ``x [..., K]`` with at most :data:`~llamatelemetry_triton.heuristics.LINEAR_MAX_ROWS` rows, a weight ``W
[N, K]`` (rows contiguous) and an optional bias ``[N]``::

    linear                   y = x @ W^T (+ bias)
    rmsnorm + linear         y = linear(rmsnorm(x) * norm_weight)
    add + rmsnorm + linear   h = x + residual;  y = linear(rmsnorm(h) * norm_weight);  returns (y, h)
    swiglu=True              W = [W_gate; W_up] ([2N, K]): y = silu(x @ W_gate^T) * (x @ W_up^T), [..., N]
    swiglu + linear          x = [gate | up] ([..., 2K]): y = (silu(gate) * up) @ W^T (+ bias)   (an MLP's down)

``y`` has ``x``'s dtype and is accumulated in fp32; ``h`` has the promoted dtype of ``x`` and ``residual``. The
normalized row is rounded to ``x``'s dtype before the product, exactly where the unfused composition
(:func:`~llamatelemetry_triton.triton_fused_add_rmsnorm`, then ``F.linear``) rounds it, so the two agree within
the dtype's tolerance.

At decode, a linear layer's time is the time to read its weight: a GEMM library tiles for many rows and reads
the weight at a fraction of the bandwidth when there is one. Here each program owns ``BLOCK_N`` weight rows and
walks them in ``BLOCK_K`` steps (weights read once, with an evict-first hint since no one reads them again
this step), multiplying every input row by them on CUDA cores: a GEMV, whose time is the weight's bytes over
the memory bandwidth when enough programs are in flight. Every program needs the whole input row anyway, so the
fused norm costs it one more read of the short row from L2 (its sum of squares) instead of a kernel launch and a
round trip of the normalized row; program 0 alone writes ``h``. With the SwiGLU epilogue a program reads the
gate rows and the matching up rows of a merged gate/up weight and writes ``silu(gate) * up`` (gate and up rounded
to ``x``'s dtype first, as the projection's output is): the activation's launch and the ``[..., 2N]``
intermediate are gone. :func:`triton_swiglu_linear` puts the activation on the other side, in front of the
down projection: each program computes ``silu(gate) * up`` of the input block it is about to multiply (rounded
to the dtype, as the SwiGLU kernel's output is), so the activation's launch and its ``[..., K]`` output go.

Between ``LINEAR_MAX_ROWS`` and ``SMALL_M_MAX_ROWS`` rows (a batch of decode steps), :func:`triton_linear` (plain
or with the SwiGLU epilogue, fp16/bf16, on Hopper) runs the small-M kernel: every row in one Tensor Core tile,
``BLOCK_N`` weight rows per program, and for a long reduction over few columns (an MLP's down projection) ``K``
split between programs whose fp32 partials the last one to finish sums in split order. On an H200 at 64 rows it
matches cuBLAS alone and, launched with programmatic dependent launch and the SwiGLU epilogue, took batch-64
decode of Llama-3.2-1B's shape from 47,598 to 49,969 tokens/s (``benchmarks/results/nvidia-h200/engine/small-m.md``).

The kernels and their launcher are in ``_linear_kernel.py``; here are the references, the custom ops, the
operations and public functions, the ahead-of-time builds and the registry entry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from llamatelemetry_core.environment import pdl_capable, triton_interpreter_enabled
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import dtype_name, format_shape
from llamatelemetry_triton._aot_shapes import TYPE_NAMES, kernel_build
from llamatelemetry_triton._bounds import int_argument, require_elements
from llamatelemetry_triton._dispatch import (
    TRITON_DTYPES,
    TritonOperation,
    check_float_tensor,
    check_vector,
    cuda_in_triton_dtypes,
    described,
    device_info,
    needs_autograd,
    run_op,
    triton_errors,
)
from llamatelemetry_triton.heuristics import LINEAR_MAX_ROWS, SMALL_M_MAX_ROWS, linear_config, small_m_config
from llamatelemetry_triton.ops._linear_kernel import (
    linear_forward,
    linear_kernel,
    linear_outputs,
    small_m_kernel,
    small_m_launch,
)
from llamatelemetry_triton.ops.glu import swiglu_reference
from llamatelemetry_triton.ops.norm import fused_add_rmsnorm_reference, rmsnorm_reference
from llamatelemetry_triton.registry import BuiltinEntry, KernelConfig

if TYPE_CHECKING:
    from collections.abc import Iterator

    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = [
    "aot_builds",
    "fused_add_rmsnorm_linear_reference",
    "linear_reference",
    "registry_entries",
    "rmsnorm_linear_reference",
    "swiglu_linear_reference",
    "triton_fused_add_rmsnorm_linear",
    "triton_linear",
    "triton_rmsnorm_linear",
    "triton_swiglu_linear",
]


# --- references: the specification, the fallback and the test oracle ---------------------------------------


def linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, swiglu: bool = False
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, the specification; with ``swiglu``, ``silu(gate) * up`` of its two halves
    (gate first), each in ``x``'s dtype as the projection returns them."""
    y = F.linear(x, weight, bias)
    return swiglu_reference(*y.chunk(2, dim=-1)) if swiglu else y


def rmsnorm_linear_reference(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    swiglu: bool = False,
) -> torch.Tensor:
    """``linear_reference(rmsnorm(x, norm_weight, eps), weight, bias, swiglu)``, the norm rounded to ``x``'s dtype
    first."""
    return linear_reference(rmsnorm_reference(x, norm_weight, eps), weight, bias, swiglu)


def fused_add_rmsnorm_linear_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    swiglu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; returns ``(linear_reference(rmsnorm(h) in x's dtype, weight, bias, swiglu), h)``."""
    normed, h = fused_add_rmsnorm_reference(x, residual, norm_weight, eps)
    return linear_reference(normed, weight, bias, swiglu), h


def swiglu_linear_reference(
    gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.linear(silu(gate) * up, weight, bias)`` with ``gate, up`` the halves of ``gate_up`` (gate first), the
    activation rounded to ``gate_up``'s dtype first as :func:`~llamatelemetry_triton.triton_swiglu` returns it."""
    return F.linear(swiglu_reference(*gate_up.chunk(2, dim=-1)), weight, bias)


# --- custom ops (torch.compile, CUDA graphs) ------------------------------------------------------------------


def _linear_launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    return linear_forward(x, None, None, weight, bias, 0.0, swiglu)[0]


def _rmsnorm_linear_launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    swiglu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = linear_forward(x, residual, norm_weight, weight, bias, eps, swiglu)
    return y, x.new_empty(0) if h is None else h  # a custom op's outputs are tensors: no h travels as empty


def _swiglu_linear_launch(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return linear_forward(gate_up, None, None, weight, bias, 0.0, glu_input=True)[0]


# The launchers are the custom ops that torch.compile and CUDA graphs see (results in new tensors).
_linear_op = torch.library.custom_op("llamatelemetry::triton_linear", _linear_launch, mutates_args=())
_rmsnorm_linear_op = torch.library.custom_op(
    "llamatelemetry::triton_rmsnorm_linear", _rmsnorm_linear_launch, mutates_args=()
)


_swiglu_linear_op = torch.library.custom_op(
    "llamatelemetry::triton_swiglu_linear", _swiglu_linear_launch, mutates_args=()
)


@_swiglu_linear_op.register_fake
def _swiglu_linear_fake(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return linear_outputs(gate_up, None, weight, False)[0]


@_linear_op.register_fake
def _linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    return linear_outputs(x, None, weight, swiglu)[0]


@_rmsnorm_linear_op.register_fake
def _rmsnorm_linear_fake(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    swiglu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = linear_outputs(x, residual, weight, swiglu)
    return y, x.new_empty(0) if h is None else h


# --- operations and public functions --------------------------------------------------------------------------


def _check_linear_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool) -> None:
    check_float_tensor(x, "x")
    check_float_tensor(weight, "weight")
    if x.dim() == 0:
        raise ConfigurationError("expected x of shape [..., K] (at least one dimension), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ConfigurationError(
            f"expected weight of shape [N, {x.shape[-1]}] (K = the last dimension of x, shape "
            f"{format_shape(x.shape)}), got {format_shape(weight.shape)}"
        )
    if swiglu and weight.shape[0] % 2:
        raise ConfigurationError(
            f"expected a merged [2N, K] gate/up weight (gate rows first) with swiglu=True, got "
            f"{format_shape(weight.shape)}: an odd number of rows"
        )
    if weight.device != x.device:
        raise ConfigurationError(f"expected weight on {x.device} like x, got {weight.device}; move it with .to()")
    if weight.dtype != x.dtype:
        raise ConfigurationError(
            f"expected weight in x's dtype {dtype_name(x.dtype)}, got {dtype_name(weight.dtype)}; convert one of them"
        )
    if bias is not None:
        check_vector(bias, weight.shape[0], "bias", x)
        if bias.dtype != x.dtype:
            raise ConfigurationError(
                f"expected bias in x's dtype {dtype_name(x.dtype)}, got {dtype_name(bias.dtype)}; convert it"
            )


def _check_swiglu_linear_args(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    check_float_tensor(gate_up, "gate_up")
    check_float_tensor(weight, "weight")
    if gate_up.dim() == 0:
        raise ConfigurationError("expected gate_up of shape [..., 2K] (at least one dimension), got a 0-d tensor")
    if weight.dim() != 2 or 2 * weight.shape[1] != gate_up.shape[-1]:
        raise ConfigurationError(
            f"expected gate_up of shape [..., 2K] (gate then up) for a weight [N, K]: got gate_up "
            f"{format_shape(gate_up.shape)} and weight {format_shape(weight.shape)}; the weight's K must be half of "
            "gate_up's last dimension"
        )
    # The same device, dtype and bias checks as a plain linear of the activation [..., K].
    _check_linear_args(gate_up[..., : weight.shape[1]], weight, bias, False)


def _check_norm_args(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float) -> None:
    check_float_tensor(norm_weight, "norm_weight")
    check_vector(norm_weight, x.shape[-1], "norm_weight", x)
    if residual is not None:
        check_float_tensor(residual, "residual")
        if residual.shape != x.shape or residual.device != x.device:
            raise ConfigurationError(
                f"expected residual of x's shape {format_shape(x.shape)} on {x.device}, got "
                f"{format_shape(residual.shape)} on {residual.device}"
            )
    given: object = eps  # validated at run time whatever the annotation says
    if isinstance(given, bool) or not isinstance(given, int | float) or not given >= 0:
        raise ConfigurationError(f"expected eps to be a number >= 0, got {eps!r}")


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _small_m_measured(rows: int, n: int, k: int, swiglu: bool, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the small-M kernel has a launch for this call here (Dynamo runs this once, eagerly, while it
    traces: the device facts are read from a context variable it cannot trace)."""
    return small_m_config(rows, n, k, swiglu, dtype, device_info(device)) is not None


def _unsupported(
    x: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor | None, small_m: bool = False, swiglu: bool = False
) -> str | None:
    """Why the Triton kernels do not take this call (the reference, ``F.linear``, then runs), or ``None``.
    ``small_m``: the call may take the small-M kernel past ``LINEAR_MAX_ROWS`` rows (the plain and SwiGLU-epilogue
    forms; ``swiglu`` says which)."""
    rows = _rows(x)
    if rows > LINEAR_MAX_ROWS:
        if not small_m:
            return (
                f"x has {rows} rows; the fused few-row kernel takes at most {LINEAR_MAX_ROWS} (past that a GEMM "
                "library's tensor-core kernel is faster)"
            )
        if rows > SMALL_M_MAX_ROWS:
            return (
                f"x has {rows} rows; the Triton kernels take at most {SMALL_M_MAX_ROWS} (past that a GEMM library's "
                "tensor-core kernel is faster)"
            )
        n = weight.shape[0] // 2 if swiglu else weight.shape[0]
        if weight.dim() == 2 and not _small_m_measured(rows, n, weight.shape[1], swiglu, x.dtype, x.device):
            return (
                f"x has {rows} rows: the few-row kernel takes at most {LINEAR_MAX_ROWS}, and the small-M kernel past "
                f"that takes fp16 and bf16 on Hopper GPUs only (where its launches were measured; fp16 in the "
                f"interpreter), not {dtype_name(x.dtype)} on {x.device}"
            )
    if weight.dim() == 2 and weight.shape[1] > 1 and weight.stride(1) != 1:
        return f"the weight's rows are not contiguous (strides {tuple(weight.stride())}); pass weight.contiguous()"
    for t in (x, weight, *others):
        if t is not None and t.dtype not in TRITON_DTYPES:
            return f"a tensor is {dtype_name(t.dtype)}; the kernel takes float16, bfloat16 and float32"
    if needs_autograd(x, weight, *others):
        return "an input requires grad; the few-row kernels have no backward (inference only)"
    return None


@triton_errors("linear")
def _linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool) -> torch.Tensor:
    out: torch.Tensor = run_op(torch.ops.llamatelemetry.triton_linear, _linear_launch, x, weight, bias, swiglu)
    return out


@triton_errors("swiglu_linear")
def _swiglu_linear_triton(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    op = torch.ops.llamatelemetry.triton_swiglu_linear
    out: torch.Tensor = run_op(op, _swiglu_linear_launch, gate_up, weight, bias)
    return out


@triton_errors("rmsnorm_linear")
def _rmsnorm_linear_triton(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    swiglu: bool,
) -> torch.Tensor:
    op = torch.ops.llamatelemetry.triton_rmsnorm_linear
    y, _ = run_op(op, _rmsnorm_linear_launch, x, None, norm_weight, weight, bias, float(eps), swiglu)
    return y  # type: ignore[no-any-return]


@triton_errors("fused_add_rmsnorm_linear")
def _fused_add_rmsnorm_linear_triton(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    swiglu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = torch.ops.llamatelemetry.triton_rmsnorm_linear
    y, h = run_op(op, _rmsnorm_linear_launch, x, residual, norm_weight, weight, bias, float(eps), swiglu)
    return y, h


LINEAR = TritonOperation(
    "triton.linear",
    linear_reference,
    _linear_triton,
    describe=lambda x, weight, bias, swiglu: described(
        x, weight, bias, triton_unsupported=_unsupported(x, weight, bias, small_m=True, swiglu=swiglu)
    ),
    traceable=lambda x, weight, bias, swiglu: (
        cuda_in_triton_dtypes(x) and _unsupported(x, weight, bias, small_m=True, swiglu=swiglu) is None
    ),
    aliases=("linear",),
)
SWIGLU_LINEAR = TritonOperation(
    "triton.swiglu_linear",
    swiglu_linear_reference,
    _swiglu_linear_triton,
    describe=lambda gate_up, weight, bias: described(
        gate_up, weight, bias, triton_unsupported=_unsupported(gate_up, weight, bias)
    ),
    traceable=lambda gate_up, weight, bias: (
        cuda_in_triton_dtypes(gate_up) and _unsupported(gate_up, weight, bias) is None
    ),
    aliases=("swiglu_linear",),
)
RMSNORM_LINEAR = TritonOperation(
    "triton.rmsnorm_linear",
    rmsnorm_linear_reference,
    _rmsnorm_linear_triton,
    describe=lambda x, nw, weight, bias, eps, swiglu: described(
        x, nw, weight, bias, triton_unsupported=_unsupported(x, weight, nw, bias)
    ),
    traceable=lambda x, nw, weight, bias, *_: cuda_in_triton_dtypes(x) and _unsupported(x, weight, nw, bias) is None,
    aliases=("rmsnorm_linear",),
)
FUSED_ADD_RMSNORM_LINEAR = TritonOperation(
    "triton.fused_add_rmsnorm_linear",
    fused_add_rmsnorm_linear_reference,
    _fused_add_rmsnorm_linear_triton,
    describe=lambda x, r, nw, weight, bias, eps, swiglu: described(
        x, r, nw, weight, bias, triton_unsupported=_unsupported(x, weight, r, nw, bias)
    ),
    traceable=lambda x, r, nw, weight, bias, *_: (
        cuda_in_triton_dtypes(x) and _unsupported(x, weight, r, nw, bias) is None
    ),
    aliases=("fused_add_rmsnorm_linear",),
)


def triton_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    swiglu: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` for a few rows: ``x [..., K]``, ``weight [N, K]``, ``bias [N]``, one dtype.

    Returns ``[..., N]`` in ``x``'s dtype, accumulated in fp32. With ``swiglu=True`` the weight is a merged
    ``[2N, K]`` gate/up projection (gate rows first) and the result is ``silu(gate) * up``, ``[..., N]``, each
    half rounded to ``x``'s dtype first as the projection's output would be (no SwiGLU launch, no ``[..., 2N]``
    intermediate). The few-row Triton kernel (CUDA cores) takes calls of at most ``LINEAR_MAX_ROWS`` rows
    (``llamatelemetry_triton.heuristics``) in fp16, bf16 or fp32 whose weight rows are contiguous and that need
    no gradient; past that, up to ``SMALL_M_MAX_ROWS`` rows in fp16 or bf16 on a Hopper GPU, the small-M kernel
    (Tensor Cores, a deterministic split of ``K`` for long reductions, launched with programmatic dependent
    launch) does. Any other call runs ``F.linear`` (and the SwiGLU reference). Raises
    :class:`ConfigurationError` for mismatched shapes, devices or dtypes.
    """
    _check_linear_args(x, weight, bias, swiglu)
    return LINEAR(x, weight, bias, bool(swiglu), backend=backend)  # type: ignore[no-any-return]


def triton_swiglu_linear(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``(silu(gate) * up) @ weight^T (+ bias)`` for a few rows, ``gate, up`` the halves of ``gate_up [..., 2K]``
    (gate first) and ``weight [N, K]``: an MLP's activation and down projection in one launch.

    Returns ``[..., N]`` in ``gate_up``'s dtype, accumulated in fp32; the activation is rounded to that dtype
    before the product, as :func:`~llamatelemetry_triton.triton_swiglu` followed by ``F.linear`` rounds it. Which
    calls the kernel takes as :func:`triton_linear` (any other call runs the SwiGLU reference and ``F.linear``).
    Raises :class:`ConfigurationError` when ``gate_up``'s last dimension is not twice the weight's, and for
    mismatched devices or dtypes.
    """
    _check_swiglu_linear_args(gate_up, weight, bias)
    return SWIGLU_LINEAR(gate_up, weight, bias, backend=backend)  # type: ignore[no-any-return]


def triton_rmsnorm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    swiglu: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """``linear(rmsnorm(x) * norm_weight, weight, bias)`` in one launch for a few rows.

    ``norm_weight`` is a ``[K]`` vector of any float dtype; the normalized row is rounded to ``x``'s dtype
    before the product, as :func:`~llamatelemetry_triton.triton_rmsnorm` followed by ``F.linear`` rounds it.
    ``swiglu``, which calls the kernel takes, and what is raised, as :func:`triton_linear`.
    """
    _check_linear_args(x, weight, bias, swiglu)
    _check_norm_args(x, None, norm_weight, eps)
    return RMSNORM_LINEAR(x, norm_weight, weight, bias, eps, bool(swiglu), backend=backend)  # type: ignore[no-any-return]


def triton_fused_add_rmsnorm_linear(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    swiglu: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``, then ``linear(rmsnorm(h) * norm_weight, weight, bias)``; returns ``(y, h)``.

    ``h`` (the promoted dtype of ``x`` and ``residual``) is the residual stream the next layer adds to; ``y``
    has ``x``'s dtype. Equal, within the dtype's tolerance, to
    :func:`~llamatelemetry_triton.triton_fused_add_rmsnorm` followed by ``F.linear`` (and, with ``swiglu=True``,
    :func:`~llamatelemetry_triton.triton_swiglu` of its two halves). Which calls the kernel takes, and what is
    raised, as :func:`triton_linear`.
    """
    check_float_tensor(residual, "residual")  # required here: None is an error, not "no residual"
    _check_linear_args(x, weight, bias, swiglu)
    _check_norm_args(x, residual, norm_weight, eps)
    return FUSED_ADD_RMSNORM_LINEAR(x, residual, norm_weight, weight, bias, eps, bool(swiglu), backend=backend)  # type: ignore[no-any-return]


# --- ahead-of-time builds ----------------------------------------------------------------------------------

# Llama-3.2-1B's decode projections (N, K): q/k/v merged, o, gate/up merged, down; and an 8B's q/k/v and down.
_AOT_SHAPES = ((3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (6144, 4096), (4096, 14336))
_AOT_GATE_UP = ((16384, 2048), (28672, 4096))  # merged gate/up of 1B and 8B: the SwiGLU epilogue's builds
_AOT_DOWN = ((2048, 8192), (4096, 14336))  # down projections of 1B and 8B: the SwiGLU prologue's builds
_AOT_ROWS = (1, 8)
# name: (NORM, HAS_RESIDUAL, SWIGLU, GLU_IN)
_VARIANTS = {
    "linear": (False, False, False, False),
    "rmsnorm_linear": (True, False, False, False),
    "fused_add_rmsnorm_linear": (True, True, False, False),
    "fused_add_rmsnorm_linear_swiglu": (True, True, True, False),
    "swiglu_linear": (False, False, False, True),
}


def aot_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """Every build of this module's kernel as it would be launched on ``device`` in ``dtype`` for the decode
    shapes of Llama-3.2-1B and 8B at 1 and 8 rows (the ahead-of-time checks, :mod:`llamatelemetry_triton.aot`)."""
    t = TYPE_NAMES[dtype]
    types = {**dict.fromkeys(("X", "R", "NW", "W", "B", "Y", "H"), f"*{t}:16"), "eps": "fp32"}
    types |= dict.fromkeys(("N", "K", "stride_x", "stride_r", "stride_w"), "i32:16")
    for rows in _AOT_ROWS:
        for name, (norm, residual, swiglu, glu_in) in _VARIANTS.items():
            for n, k in _AOT_GATE_UP if swiglu else _AOT_DOWN if glu_in else _AOT_SHAPES:
                config = linear_config(rows, n, k, dtype, device)
                block_n = max(1, config.block_size // 2) if swiglu else config.block_size
                flags = {"NORM": norm, "HAS_RESIDUAL": residual, "HAS_BIAS": False, "SWIGLU": swiglu}
                flags |= {"GLU_IN": glu_in, "USE_PDL": pdl_capable(device)}  # as programmatic_launch launches it
                persistent = 0 < config.programs < -(-(n // 2 if swiglu else n) // block_n)  # as linear_forward
                flags["PERSISTENT"] = persistent
                yield kernel_build(
                    f"triton.{name}[{t},M={rows},BLOCK_N={block_n},BLOCK_K={config.chunk_size}]",
                    linear_kernel,
                    types,
                    flags
                    | {"EVEN_K": k % config.chunk_size == 0, "PIPELINED": True}
                    | {"BLOCK_M": rows, "BLOCK_N": block_n, "BLOCK_K": config.chunk_size},
                    num_warps=config.num_warps,
                    num_stages=config.num_stages,
                )
    yield from _small_m_builds(device, dtype)


def _small_m_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """The small-M kernel's builds at Llama-3.2-1B's and 8B's projections, 64 rows, where it is chosen."""
    t = TYPE_NAMES[dtype]
    types = dict.fromkeys(("X", "W", "B", "Y"), f"*{t}:16")
    types |= dict.fromkeys(("N", "K", "k_split", "stride_x", "stride_w"), "i32:16")
    rows = SMALL_M_MAX_ROWS
    for swiglu, shapes in ((False, _AOT_SHAPES), (True, _AOT_GATE_UP)):
        for n2, k in shapes:
            n = n2 // 2 if swiglu else n2
            config = small_m_config(rows, n, k, swiglu, dtype, device)
            if config is None:
                return
            _, splits = small_m_launch(k, config)
            # One split passes the output for the unused partials and counts, as the launcher does.
            workspace = {"P": "*fp32:16", "C": "*i32:16"} if splits > 1 else dict.fromkeys(("P", "C"), f"*{t}:16")
            yield kernel_build(
                f"triton.linear[{t},small_m,M={rows},N={n},K={k},swiglu={swiglu}]",
                small_m_kernel,
                types | workspace,
                {"HAS_BIAS": False, "SWIGLU": swiglu, "SPLIT_K": splits, "EVEN_K": k % config.chunk_size == 0}
                | {"PIPELINED": True, "BLOCK_M": rows, "BLOCK_N": config.block_size, "BLOCK_K": config.chunk_size}
                | {"USE_PDL": pdl_capable(device)},  # as programmatic_launch launches it
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )


# --- registry entries ---------------------------------------------------------------------------------------


def _linear_bounds(args: Mapping[str, Any], grid: tuple[int, ...]) -> None:
    m, n, k = (int_argument(args, name, "linear") for name in ("M", "N", "K"))
    block_n, block_m = args.get("BLOCK_N"), args.get("BLOCK_M")
    if not isinstance(block_n, int) or not isinstance(block_m, int) or m > block_m:
        raise ConfigurationError(
            f"kernel 'linear': expected BLOCK_M >= M = {m} and BLOCK_N as powers of two, got BLOCK_M={block_m!r}, "
            f"BLOCK_N={block_n!r}"
        )
    if args.get("GLU_IN") and (args.get("NORM") or args.get("HAS_RESIDUAL") or args.get("SWIGLU")):
        raise ConfigurationError(
            "kernel 'linear': GLU_IN (a [gate | up] input) cannot be combined with NORM, HAS_RESIDUAL or SWIGLU; "
            "launch it with those False"
        )
    block_k = args.get("BLOCK_K")
    if args.get("PERSISTENT") and (not isinstance(block_k, int) or block_k < k):
        raise ConfigurationError(
            f"kernel 'linear': PERSISTENT holds each program's input rows whole: expected BLOCK_K >= K = {k}, got "
            f"BLOCK_K={block_k!r}; launch it with a BLOCK_K covering K, or PERSISTENT=False"
        )
    if args.get("EVEN_K") and isinstance(block_k, int) and block_k > 0 and k % block_k:
        raise ConfigurationError(
            f"kernel 'linear': EVEN_K skips the column mask: expected K = {k} to be a multiple of BLOCK_K = {block_k}; "
            "launch it with EVEN_K=False"
        )
    if args.get("HAS_RESIDUAL") and not args.get("NORM"):
        raise ConfigurationError(
            "kernel 'linear': HAS_RESIDUAL (h = x + residual) comes with the norm that writes h: launch it with "
            "NORM=True, or add the residual first"
        )
    if m == 0 or n == 0 or k == 0 or not grid or grid[0] == 0:
        return
    halves = 2 if args.get("SWIGLU") else 1  # gate rows, then as many up rows
    # A persistent launch's programs walk every column block, whatever the grid.
    covered = n if args.get("PERSISTENT") else min(n, grid[0] * block_n)
    n_reached = covered + (halves - 1) * n
    stride_w, stride_x = int_argument(args, "stride_w", "linear"), int_argument(args, "stride_x", "linear")
    require_elements(args, "W", (n_reached - 1) * stride_w + k, "linear", f"{n_reached} rows of {k}")
    width = 2 * k if args.get("GLU_IN") else k  # [gate | up] rows with the SwiGLU prologue
    require_elements(args, "X", (m - 1) * stride_x + width, "linear", f"{m} rows of {width} at stride {stride_x}")
    require_elements(args, "Y", m * n, "linear", f"{m} rows of {n}")
    if args.get("HAS_BIAS"):
        require_elements(args, "B", halves * n, "linear", f"{halves} x N = {n}")
    if args.get("NORM"):
        require_elements(args, "NW", k, "linear", f"K = {k}")
    if args.get("HAS_RESIDUAL"):
        stride_r = int_argument(args, "stride_r", "linear")
        require_elements(args, "R", (m - 1) * stride_r + k, "linear", f"{m} rows of {k} at stride {stride_r}")
        require_elements(args, "H", m * k, "linear", f"{m} rows of {k}")


def registry_entries() -> dict[str, BuiltinEntry]:
    """This module's kernel in the registry (``get_kernel("linear")``): kernel, default launch config, bounds."""
    doc = "y = x @ W^T for a few rows; (X, R, NW, W, B, Y, H, M, N, K, stride_x, stride_r, stride_w, eps, ...)"
    meta: dict[str, int | bool] = {"NORM": False, "HAS_RESIDUAL": False, "HAS_BIAS": False, "SWIGLU": False}
    meta["GLU_IN"] = False
    meta |= {"EVEN_K": False, "BLOCK_N": 4, "BLOCK_K": 256}
    meta["PIPELINED"] = not triton_interpreter_enabled()  # the interpreter runs `while` loops (see the kernel)
    return {"linear": (linear_kernel, KernelConfig("linear", 1, 4, 2, meta=meta, description=doc), _linear_bounds)}
