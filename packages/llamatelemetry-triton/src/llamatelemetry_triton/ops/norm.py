"""LayerNorm and RMSNorm over the last dimension, optionally fused with the residual add before them.

For a row ``x`` of ``N`` elements, in fp32 whatever the input dtype::

    LayerNorm   y = (x - mean(x)) * rsqrt(var(x) + eps) * weight + bias      (biased variance)
    RMSNorm     y = x * rsqrt(mean(x^2) + eps) * weight
    fused       h = x + residual;  y = norm(h);  returns (y, h)               (h: the next residual)

``x`` may have any number of leading dimensions and any strides; ``weight`` and ``bias`` are optional vectors of
``N`` elements of any float dtype; ``y`` has ``x``'s dtype and ``h`` the promoted dtype of ``x`` and ``residual``.
The fused form reads ``x`` and ``residual`` once and writes ``h`` and ``y`` once, where the unfused PyTorch code
(Hugging Face's ``LlamaRMSNorm`` after an add) makes several fp32 round trips.

Forward (here): one program per row; a row that fits in one block stays in registers, a longer one is looped
over three times (sum, centered sum of squares, normalize; RMSNorm needs two). The backward, with its kernels,
launcher, custom op and builds, is in ``_norm_backward.py``; the autograd function below joins the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from llamatelemetry_core.environment import pdl_capable, programmatic_launch
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import format_shape
from llamatelemetry_triton._aot_shapes import HIDDEN_SIZES, TYPE_NAMES
from llamatelemetry_triton._bounds import grid_rows, int_argument, require_elements, rowwise
from llamatelemetry_triton._compat import gdc_launch_dependents, gdc_wait, tl, triton
from llamatelemetry_triton._dispatch import (
    TRITON_DTYPES,
    TritonOperation,
    check_float_tensor,
    check_vector,
    compute_dtype,
    cuda_in_triton_dtypes,
    described,
    device_info,
    needs_autograd,
    triton_errors,
)
from llamatelemetry_triton._launch import on_device, rows_of
from llamatelemetry_triton.heuristics import current_max_block_size, norm_config
from llamatelemetry_triton.ops._norm_backward import backward_build, build_name, norm_backward
from llamatelemetry_triton.registry import BuiltinEntry, KernelConfig

if TYPE_CHECKING:
    from collections.abc import Iterator

    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = [
    "aot_builds",
    "fused_add_layernorm_reference",
    "fused_add_rmsnorm_reference",
    "layernorm_reference",
    "registry_entries",
    "rmsnorm_reference",
    "triton_fused_add_layernorm",
    "triton_fused_add_rmsnorm",
    "triton_layernorm",
    "triton_rmsnorm",
]


# --- references: the specification, the fallback and the test oracle ---------------------------------------


def layernorm_reference(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm of the last dimension in fp32 (fp64 for fp64 inputs), returned in ``x``'s dtype."""
    xf = x.to(compute_dtype(x))
    mean = xf.mean(-1, keepdim=True)
    centered = xf - mean
    y = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of the last dimension in fp32 (fp64 for fp64 inputs), returned in ``x``'s dtype."""
    xf = x.to(compute_dtype(x))
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    return y.to(x.dtype)


def fused_add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; returns ``(rmsnorm(h) in x's dtype, h)``."""
    h = x + residual
    return rmsnorm_reference(h, weight, eps).to(x.dtype), h


def fused_add_layernorm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``; returns ``(layernorm(h) in x's dtype, h)``."""
    h = x + residual
    return layernorm_reference(h, weight, bias, eps).to(x.dtype), h


# --- kernels ----------------------------------------------------------------------------------------------


@triton.jit  # type: ignore[untyped-decorator]
def _add_residual(x, R, H, cols, mask, HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr):  # type: ignore[no-untyped-def]
    """A block of the row to normalize, in fp32: x, or h = x + residual rounded to h's dtype (the sum the model
    stores), written to H when STORE_H."""
    if HAS_RESIDUAL:
        h = (x + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
        if STORE_H:
            tl.store(H + cols, h, mask=mask)
        x = h.to(tl.float32)
    return x


@triton.jit  # type: ignore[untyped-decorator]
def _store_normalized(  # type: ignore[no-untyped-def]
    Y, W, B, cols, mask, xc, rstd, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, EVICTION: tl.constexpr
):
    """y = xc * rstd (* weight) (+ bias), stored in Y's dtype; weight and bias loaded with ``EVICTION``."""
    y = xc * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0, eviction_policy=EVICTION).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0, eviction_policy=EVICTION).to(tl.float32)
    tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit  # type: ignore[untyped-decorator]
def _norm_fwd_kernel(  # type: ignore[no-untyped-def]
    X,
    R,
    W,
    B,
    Y,
    H,
    Mean,
    Rstd,
    stride_x,
    stride_r,
    n_cols,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_STATS: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    if USE_PDL:  # launched as a dependent: wait for the kernel before (it writes x or the residual)
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * n_cols
    R += row * stride_r
    H += row * n_cols
    if SINGLE_BLOCK:
        cols = tl.arange(0, BLOCK_SIZE)
        mask = cols < n_cols
        # Without a bias, the weight is loaded before the reductions, so that its latency overlaps x's instead of
        # following their barriers (RMSNorm at 16384 x 8192 on an H100: 99.2% -> 99.8% of copy). Holding weight
        # and bias both across the reductions costs registers: LayerNorm there fell to 89.5%, so it loads them after.
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT and not HAS_BIAS:
            w = tl.load(W + cols, mask=mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
        x = _add_residual(x, R, H, cols, mask, HAS_RESIDUAL, True)
        if USE_PDL:  # the row is read: the next kernel may start (it waits for this one to finish)
            gdc_launch_dependents()
        if IS_RMS:
            xc = x
        else:
            mean = tl.sum(x, axis=0) / n_cols
            xc = tl.where(mask, x - mean, 0.0)
            if STORE_STATS:
                tl.store(Mean + row, mean)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=0) / n_cols + eps)
        if STORE_STATS:
            tl.store(Rstd + row, rstd)
        if HAS_WEIGHT and not HAS_BIAS:
            y = xc * rstd * w
            tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
        else:
            _store_normalized(Y, W, B, cols, mask, xc, rstd, HAS_WEIGHT, HAS_BIAS, "evict_last")
    else:
        # Loops are `while`, not `range()`: Triton 3.6's interpreter cannot take runtime range() bounds under NumPy 2.4.
        # Pass 1: sum (LayerNorm) or sum of squares (RMSNorm), writing h on the way.
        acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        start = tl.program_id(0) * 0
        while start < n_cols:
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            x = _add_residual(x, R, H, cols, mask, HAS_RESIDUAL, True)
            if IS_RMS:
                acc += x * x
            else:
                acc += x
            start += BLOCK_SIZE
        if IS_RMS:
            mean = 0.0
            var = tl.sum(acc, axis=0) / n_cols
        else:
            mean = tl.sum(acc, axis=0) / n_cols
            if STORE_STATS:
                tl.store(Mean + row, mean)
            # Pass 2: centered sum of squares (two passes, not E[x^2] - E[x]^2, which cancels badly).
            acc = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
            start = tl.program_id(0) * 0
            while start < n_cols:
                cols = start + tl.arange(0, BLOCK_SIZE)
                mask = cols < n_cols
                x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                x = _add_residual(x, R, H, cols, mask, HAS_RESIDUAL, False)
                xc = tl.where(mask, x - mean, 0.0)
                acc += xc * xc
                start += BLOCK_SIZE
            var = tl.sum(acc, axis=0) / n_cols
        rstd = tl.math.rsqrt(var + eps)
        if STORE_STATS:
            tl.store(Rstd + row, rstd)
        # Last pass: normalize and write.
        start = tl.program_id(0) * 0
        while start < n_cols:
            cols = start + tl.arange(0, BLOCK_SIZE)
            mask = cols < n_cols
            x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            x = _add_residual(x, R, H, cols, mask, HAS_RESIDUAL, False)
            _store_normalized(Y, W, B, cols, mask, x - mean, rstd, HAS_WEIGHT, HAS_BIAS, "")
            start += BLOCK_SIZE


# --- host launchers -------------------------------------------------------------------------------------------


def _forward_outputs(
    x: torch.Tensor, residual: torch.Tensor | None, is_rms: bool, store_stats: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Empty ``(y, h, mean, rstd)`` of a forward (``None`` where :func:`_norm_forward` says)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = None if residual is None else torch.empty(x.shape, dtype=torch.result_type(x, residual), device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device) if store_stats else None
    mean = None if is_rms or rstd is None else torch.empty_like(rstd)
    return y, h, mean, rstd


def _norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    store_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(y, h, mean, rstd)``: ``h`` is ``None`` without a residual; ``mean`` and ``rstd`` (per row, fp32, for the
    backward) are ``None`` unless ``store_stats``, and ``mean`` is ``None`` for RMSNorm, which has none."""
    n_cols = x.shape[-1]
    y, h, mean, rstd = _forward_outputs(x, residual, is_rms, store_stats)
    if x.numel() == 0:
        return y, h, mean, rstd
    x2, n_rows, stride_x = rows_of(x)
    r2, _, stride_r = rows_of(residual) if residual is not None else (x2, n_rows, stride_x)
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    config = norm_config(
        n_cols, x.dtype, device_info(x.device), max_block=current_max_block_size(), layernorm=not is_rms
    )
    pdl = programmatic_launch(x)
    with on_device(x):
        _norm_fwd_kernel[(n_rows,)](
            x2,
            r2,
            w,
            b,
            y,
            h if h is not None else y,
            mean if mean is not None else y,
            rstd if rstd is not None else y,
            stride_x,
            stride_r,
            n_cols,
            eps,
            IS_RMS=is_rms,
            HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            STORE_STATS=store_stats,
            SINGLE_BLOCK=config.single_block,
            BLOCK_SIZE=config.block_size,
            USE_PDL=pdl,
            num_warps=config.num_warps,
            enable_fp_fusion=True,
            num_stages=config.num_stages,
            launch_pdl=pdl,
        )
    return y, h, mean, rstd


# --- custom ops (torch.compile, CUDA graphs) ------------------------------------------------------------------
# A custom op's outputs are tensors: absent ones travel as empty tensors.


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("llamatelemetry::triton_norm_fwd", mutates_args=())
def _norm_fwd_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, mean, rstd = _norm_forward(x, residual, weight, bias, eps, is_rms)
    assert rstd is not None
    return y, _or_empty(h, x), _or_empty(mean, rstd), rstd


@_norm_fwd_op.register_fake
def _norm_fwd_fake(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, mean, rstd = _forward_outputs(x, residual, is_rms, True)
    assert rstd is not None
    return y, _or_empty(h, x), _or_empty(mean, rstd), rstd


def _forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    store_stats: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The forward launch: the custom op while ``torch.compile`` traces (statistics always kept), direct otherwise."""
    if torch.compiler.is_compiling():
        y, h, mean, rstd = torch.ops.llamatelemetry.triton_norm_fwd(x, residual, weight, bias, eps, is_rms)
        return y, (h if residual is not None else None), (None if is_rms else mean), rstd
    return _norm_forward(x, residual, weight, bias, eps, is_rms, store_stats)


# --- autograd ---------------------------------------------------------------------------------------------


class NormFunction(torch.autograd.Function):
    """LayerNorm or RMSNorm, with an optional residual added first; returns ``(y, h)`` (``h`` empty without one)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        is_rms: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y, h, mean, rstd = _forward(x, residual, weight, bias, eps, is_rms, True)
        ctx.save_for_backward(h if h is not None else x, weight, mean, rstd)
        ctx.is_rms = is_rms
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        if h is None:
            h = x.new_empty(0)
            ctx.mark_non_differentiable(h)
        ctx.set_materialize_grads(False)
        return y, h

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor | None, dh: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        normed, weight, mean, rstd = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(normed)
        dres = dh if ctx.residual_dtype is not None else None
        dx, dw, db = norm_backward(dy, normed, dres, weight, mean, rstd, ctx.is_rms, ctx.has_bias)
        dresidual = None if ctx.residual_dtype is None else dx.to(ctx.residual_dtype)
        return dx.to(ctx.x_dtype), dresidual, dw, db, None, None


# --- operations and public functions --------------------------------------------------------------------------


def _check_norm_args(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> None:
    check_float_tensor(x, "x")
    if x.dim() == 0:
        raise ConfigurationError("expected x with at least one dimension (the one normalized), got a 0-d tensor")
    n = x.shape[-1]
    if residual is not None:
        check_float_tensor(residual, "residual")
        if residual.shape != x.shape:
            raise ConfigurationError(
                f"expected residual of the shape of x, {format_shape(x.shape)}, got {format_shape(residual.shape)}"
            )
        if residual.device != x.device:
            raise ConfigurationError(f"expected residual on {x.device} like x, got {residual.device}")
    check_vector(weight, n, "weight", x)
    check_vector(bias, n, "bias", x)
    given: object = eps  # validated at run time whatever the annotation says
    if isinstance(given, bool) or not isinstance(given, int | float) or not given >= 0:
        raise ConfigurationError(f"expected eps to be a number >= 0, got {eps!r}")


def _norm_apply(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if needs_autograd(x, residual, weight, bias):
        y, h = NormFunction.apply(x, residual, weight, bias, float(eps), is_rms)  # type: ignore[no-untyped-call]
        return y, h
    y, h, _, _ = _forward(x, residual, weight, bias, float(eps), is_rms, False)
    return y, h


@triton_errors("layernorm")
def _layernorm_triton(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return _norm_apply(x, None, weight, bias, eps, False)[0]


@triton_errors("rmsnorm")
def _rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _norm_apply(x, None, weight, None, eps, True)[0]


@triton_errors("fused_add_rmsnorm")
def _fused_add_rmsnorm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = _norm_apply(x, residual, weight, None, eps, True)
    assert h is not None
    return y, h


@triton_errors("fused_add_layernorm")
def _fused_add_layernorm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    y, h = _norm_apply(x, residual, weight, bias, eps, False)
    assert h is not None
    return y, h


def _residual_dtype_reason(residual: torch.Tensor) -> str | None:
    if residual.dtype not in TRITON_DTYPES:
        return f"the residual's dtype {residual.dtype} is not one of float16, bfloat16, float32"
    return None


LAYERNORM = TritonOperation(
    "triton.layernorm",
    layernorm_reference,
    _layernorm_triton,
    describe=lambda x, weight, bias, eps: described(x, weight, bias),
    traceable=lambda x, *_: cuda_in_triton_dtypes(x),
    aliases=("layernorm",),
)
RMSNORM = TritonOperation(
    "triton.rmsnorm",
    rmsnorm_reference,
    _rmsnorm_triton,
    describe=lambda x, weight, eps: described(x, weight),
    traceable=lambda x, *_: cuda_in_triton_dtypes(x),
    aliases=("rmsnorm",),
)
FUSED_ADD_RMSNORM = TritonOperation(
    "triton.fused_add_rmsnorm",
    fused_add_rmsnorm_reference,
    _fused_add_rmsnorm_triton,
    describe=lambda x, residual, weight, eps: described(
        x, residual, weight, triton_unsupported=_residual_dtype_reason(residual)
    ),
    traceable=lambda x, residual, *_: cuda_in_triton_dtypes(x, residual),
    aliases=("fused_add_rmsnorm",),
)
FUSED_ADD_LAYERNORM = TritonOperation(
    "triton.fused_add_layernorm",
    fused_add_layernorm_reference,
    _fused_add_layernorm_triton,
    describe=lambda x, residual, weight, bias, eps: described(
        x, residual, weight, bias, triton_unsupported=_residual_dtype_reason(residual)
    ),
    traceable=lambda x, residual, *_: cuda_in_triton_dtypes(x, residual),
    aliases=("fused_add_layernorm",),
)


def triton_layernorm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` (``[..., N]``, fp16/bf16/fp32, any strides).

    ``weight`` and ``bias`` are optional ``[N]`` vectors; the result has ``x``'s dtype. Differentiable in ``x``,
    ``weight`` and ``bias``. Runs the fused Triton kernel where it can, the PyTorch reference otherwise
    (``backend="triton"`` or ``"reference"`` chooses). Raises :class:`ConfigurationError` for mismatched shapes.
    """
    _check_norm_args(x, None, weight, bias, eps)
    return LAYERNORM(x, weight, bias, eps, backend=backend)  # type: ignore[no-any-return]


def triton_rmsnorm(
    x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *, backend: str | None = None
) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (``[..., N]``): ``x * rsqrt(mean(x^2) + eps) * weight``.

    Computed in fp32, returned in ``x``'s dtype; differentiable in ``x`` and ``weight``.
    """
    _check_norm_args(x, None, weight, None, eps)
    return RMSNORM(x, weight, eps, backend=backend)  # type: ignore[no-any-return]


def triton_fused_add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``, then RMSNorm of ``h``, in one pass; returns ``(normed, h)``.

    ``h`` (the promoted dtype of ``x`` and ``residual``) is the residual stream the next layer adds to;
    ``normed`` has ``x``'s dtype. Differentiable in ``x``, ``residual`` and ``weight``.
    """
    check_float_tensor(residual, "residual")  # required here: None is an error, not "no residual"
    _check_norm_args(x, residual, weight, None, eps)
    return FUSED_ADD_RMSNORM(x, residual, weight, eps, backend=backend)  # type: ignore[no-any-return]


def triton_fused_add_layernorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual``, then LayerNorm of ``h``, in one pass; returns ``(normed, h)``."""
    check_float_tensor(residual, "residual")  # required here: None is an error, not "no residual"
    _check_norm_args(x, residual, weight, bias, eps)
    return FUSED_ADD_LAYERNORM(x, residual, weight, bias, eps, backend=backend)  # type: ignore[no-any-return]


# --- ahead-of-time builds ----------------------------------------------------------------------------------


# name: (is_rms, has_residual, has_bias, what) of LayerNorm, RMSNorm and their fused residual forms (all weighted)
_VARIANTS = {
    "layernorm": (False, False, True, "LayerNorm"),
    "rmsnorm": (True, False, False, "RMSNorm"),
    "fused_add_rmsnorm": (True, True, False, "residual add + RMSNorm"),
    "fused_add_layernorm": (False, True, True, "residual add + LayerNorm"),
}


def aot_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """Every build of this module's kernels as they would be launched on ``device`` in ``dtype``, for the
    representative shapes (the ahead-of-time checks, :mod:`llamatelemetry_triton.aot`)."""
    from llamatelemetry_core.aot import KernelBuild, kernel_signature

    t = TYPE_NAMES[dtype]
    types = {**dict.fromkeys(("X", "R", "W", "B", "Y", "H"), f"*{t}"), "Mean": "*fp32", "Rstd": "*fp32"}
    signature = kernel_signature(_norm_fwd_kernel, {**types, "eps": "fp32"})
    for hidden in HIDDEN_SIZES:
        for name, (is_rms, residual, bias, _) in _VARIANTS.items():
            config = norm_config(hidden, dtype, device, layernorm=not is_rms)
            yield KernelBuild(
                build_name(name, "fwd", dtype, hidden, config),
                _norm_fwd_kernel,
                signature,
                {"IS_RMS": is_rms, "HAS_RESIDUAL": residual, "HAS_WEIGHT": True, "HAS_BIAS": bias}
                | {"STORE_STATS": False, "SINGLE_BLOCK": config.single_block, "BLOCK_SIZE": config.block_size}
                | {"USE_PDL": pdl_capable(device)},  # as programmatic_launch launches it
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
            yield backward_build(device, dtype, hidden, name, is_rms=is_rms, residual=residual, bias=bias)


# --- registry entries ---------------------------------------------------------------------------------------


def _norm_bounds(args: Mapping[str, Any], grid: tuple[int, ...]) -> None:
    rows, n_cols = grid_rows(grid), int_argument(args, "n_cols", "norm")
    if rows == 0 or n_cols == 0:
        return
    rowwise("norm", (("X", "stride_x"),), ("Y",))(args, grid)
    if args.get("HAS_RESIDUAL"):
        rowwise("norm", (("R", "stride_r"),), ("H",))(args, grid)
    for flag, name in (("HAS_WEIGHT", "W"), ("HAS_BIAS", "B")):
        if args.get(flag):
            require_elements(args, name, n_cols, "norm", f"n_cols = {n_cols}")
    if args.get("STORE_STATS"):
        for name in ("Mean", "Rstd"):
            require_elements(args, name, rows, "norm", f"one value per row, {rows} rows")


def registry_entries() -> dict[str, BuiltinEntry]:
    """This module's kernels in the registry (``get_kernel(name)``): kernel, default launch config, bounds check."""
    doc = "(X, R, W, B, Y, H, Mean, Rstd, stride_x, stride_r, n_cols, eps, IS_RMS, HAS_RESIDUAL, ...)"
    entries: dict[str, BuiltinEntry] = {}
    for name, (is_rms, residual, _, what) in _VARIANTS.items():
        meta = {"IS_RMS": is_rms, **({"HAS_RESIDUAL": True} if residual else {})}
        entries[name] = (
            _norm_fwd_kernel,
            KernelConfig(name, 1024, 4, 1, meta=meta, description=f"{what} {doc}"),
            _norm_bounds,
        )
    return entries
