"""``matmul_tensor_core``: ``C = A @ B`` multiplied in fp16 or bf16 on Tensor Cores, returned in A's dtype.

Layout: ``A [..., M, K]``, ``B [..., K, N]`` (batch dimensions broadcast as in :func:`torch.matmul`),
``C [..., M, N]``. What is computed, by every implementation (this is the specification):

1. Range scaling, for ``dtype=torch.float16`` when an input is not already fp16. fp16 stops at 65504, so fp32
   values beyond it (or products and sums beyond it) would silently become inf, and values below 6e-8 become
   zero. Two powers of two ``sA = 2^-eA`` and ``sB = 2^-eB`` (up or down: ``eA``, ``eB`` may be negative) are
   chosen on the device, without a host sync, as the largest scales with ``max|A sA| <= 2^15``,
   ``max|B sB| <= 2^15`` and ``K max|A sA| max|B sB| <= 2^15``: then no input, partial sum or output element
   can overflow, and the largest values sit as high in fp16's range as that allows (tiny inputs are brought
   up instead of flushed to zero). Scaling by a power of two is exact, except for values far below an input's
   largest (about 2^-24 of it and less), which lose relative precision: inputs spanning many decades are
   better multiplied with ``dtype=torch.bfloat16``. bf16 has fp32's range and is never scaled.
2. ``Ã = round(A sA)``, ``B̃ = round(B sB)`` to ``dtype``;
3. ``C̃ = round(Ã @ B̃)`` to ``dtype``, products accumulated in fp32 (what cuBLAS does on Tensor Cores);
4. ``C = C̃ 2^(eA+eB)`` in A's dtype (into ``out`` when given). inf and NaN inputs propagate as in fp32, except
   that an infinite input meeting a value that rounds to zero in ``dtype`` gives NaN (``inf * 0``), not inf.

Backward (when A or B requires grad): ``dA = dC @ B^T`` and ``dB = A^T @ dC``, each computed by this same
operation (range-scaled, Tensor Cores where they run), so gradients of inputs far outside fp16's range stay
finite exactly when the forward does; batch dimensions that were broadcast are summed back.

Implementations (chosen by :mod:`llamatelemetry_core.selection`):

* ``fused`` (CUDA compute capability >= 7.5 with Triton; :mod:`~llamatelemetry_tensorcore.fused_matmul`): steps 1-4
  in two Triton launches (a reduction to the largest values, then one GEMM that scales, rounds, multiplies and
  unscales its tiles in registers; one launch for small inputs; K split over several programs, and a third
  launch that adds their sums, where the output has too few tiles to fill the GPU), for fp16 products of
  non-fp16 inputs up to :data:`~llamatelemetry_tensorcore.fused_matmul.FUSED_MATMUL_MAX_MNK`, where the separate
  passes of ``tensor_core`` cost more than the product.
* ``tensor_core`` (CUDA, compute capability >= 7.0; bf16 needs >= 8.0): pads the dimensions cuBLAS needs
  aligned with zeros (see :func:`tensor_core_padding`), runs :func:`torch.matmul` in ``dtype``, slices back.
* ``reference`` (every device): the same numbers from an fp32 matmul of the rounded inputs (a product of two
  fp16 or bf16 values is exact in fp32). This is what runs on a CPU and on GPUs older than Volta: the
  Tensor Core result without the speed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.selection import CallSpec, NoticeReason, Operation, requires_min_capability
from llamatelemetry_core.traced import dispatch
from llamatelemetry_core.validation import check_dtype, check_same_device, check_tensor, dtype_name, format_shape

__all__ = [
    "MATMUL_OPERATION",
    "MatmulCall",
    "MatmulPadding",
    "matmul_tensor_core",
    "product_thresholds",
    "range_scale_exponents",
    "tensor_core_padding",
]

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_COMPUTE_DTYPES = (torch.float16, torch.bfloat16)
# 2^15 = 32768 leaves a factor of two under fp16's 65504 for the rounding of inputs and of the sum.
_FP16_SAFE_LOG2 = 15.0
# Scaling up stops at 2^960, which keeps every scale and its inverse finite in float64.
_MAX_UPSCALE_LOG2 = 960.0
_ALIGNMENT_BYTES = 16


@dataclass(frozen=True)
class MatmulCall:
    """The facts of a call selection reads beyond the compute dtype and the shapes: the inputs' dtypes."""

    a_dtype: torch.dtype
    b_dtype: torch.dtype


@functools.cache
def _call_facts(a_dtype: torch.dtype, b_dtype: torch.dtype) -> MatmulCall:
    return MatmulCall(a_dtype, b_dtype)


@dataclass(frozen=True)
class MatmulPadding:
    """Zeros appended to M, N and K so that cuBLAS can use its Tensor Core kernels."""

    m: int = 0
    n: int = 0
    k: int = 0

    @property
    def any(self) -> bool:
        return bool(self.m or self.n or self.k)


def tensor_core_padding(info: DeviceInfo, m: int, n: int, k: int, dtype: torch.dtype = torch.float16) -> MatmulPadding:
    """How far to pad ``[M, K] @ [K, N]`` in ``dtype`` on ``info`` (all zeros where nothing is needed).

    Tensor Core GEMM kernels load rows in 16-byte vectors (8 fp16 or bf16 elements). On Volta and Turing,
    cuBLAS uses its Tensor Core kernels only when M, N and K are all multiples of 8, so all three are padded.
    From Ampere on it has Tensor Core kernels for any size, but the fast ones (TMA-fed on Hopper and Blackwell)
    need 16-byte aligned rows: K and N, the row lengths of A, B and C, are padded. Zero padding does not change
    the product; the result is sliced back to ``[M, N]``.
    """
    if not info.is_cuda or not info.has_tensor_cores:
        return MatmulPadding()
    align = max(1, _ALIGNMENT_BYTES // dtype.itemsize)

    def up(size: int) -> int:
        return -size % align

    if not info.capability_at_least(8, 0):
        return MatmulPadding(m=up(m), n=up(n), k=up(k))
    return MatmulPadding(n=up(n), k=up(k))


def _device_info(device: torch.device) -> DeviceInfo:
    """Facts about a tensor's device from core's cache.

    Asked on every call: ``refresh_memory=False`` keeps driver queries (free memory) out of the hot path and out of
    CUDA graph captures, where an unsupported driver call would invalidate the capture.
    """
    return get_device_info(device, refresh_memory=False)


def _largest_finite(x: torch.Tensor) -> torch.Tensor:
    """The largest finite ``|x|`` (0 when there is none), as a 0-dim tensor on x's device."""
    finite = torch.nan_to_num(x.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    largest: torch.Tensor = torch.linalg.vector_norm(finite, ord=math.inf)
    return largest


def product_thresholds(k: int) -> tuple[int, int, int, int]:
    """``(bits, half, quarter, eighth)`` for inner dimension ``k`` (>= 1): what step 1's product bound needs of K.

    With ``K = fK 2^bits`` (``fK`` in [1/2, 1)) and 24-bit integer mantissas ``mA``, ``mB`` of the largest
    values (``max|A| = mA 2^(xA-24)``), the product ``P = mA mB fK / 2^48`` lies in [1/8, 1), and it exceeds
    1/2 exactly when ``mA mB > half`` (1/4: ``quarter``, 1/8: ``eighth``): integer comparisons whose
    thresholds are computed here once per call, on the host.
    """
    bits = k.bit_length()
    return bits, (1 << (47 + bits)) // k, (1 << (46 + bits)) // k, (1 << (45 + bits)) // k


def _exponents_from_maxima(largest: torch.Tensor, k: int) -> torch.Tensor:
    """``[eA, eB]`` (float64) from ``[max|A|, max|B|]`` (finite, >= 0) and K, computed exactly.

    The arithmetic, which the fused kernel (:mod:`~llamatelemetry_tensorcore._fused_kernels`) follows step by
    step in integers:

    * ``max = f 2^x`` with ``f`` in [1/2, 1) (frexp), so ``ceil(log2 max) = x - (f == 1/2)`` and
      ``e0 = max(ceil(log2 max) - 15, -960)`` (0 for an input with no finite non-zero value);
    * ``ceil(log2(K max|A| max|B|)) = xA + xB + bits + c`` with ``c`` in {0, -1, -2, -3} from comparing the product
      of the 24-bit mantissas ``m = ceil(f 2^24)`` with :func:`product_thresholds` (exact for inputs of fp32
      precision or less; a float64 maximum's mantissa is rounded up to 24 bits, which can only make the product
      bound stricter);
    * ``p = max(ceil(log2(K max|A| max|B|)) - 15 - e0A - e0B, 0)`` (0 unless both inputs have a finite non-zero
      value), ``eA = e0A + ceil(p / 2)``, ``eB = e0B + floor(p / 2)``.
    """
    fraction, exponent = torch.frexp(largest.to(torch.float64))
    x = exponent.to(torch.float64)
    present = largest > 0
    e0 = torch.where(
        present, (x - (fraction == 0.5).to(torch.float64) - _FP16_SAFE_LOG2).clamp(min=-_MAX_UPSCALE_LOG2), 0.0
    )
    mantissa = torch.ceil(fraction * 2.0**24)
    product = mantissa[0] * mantissa[1]  # < 2^49: exact in float64
    bits, half, quarter, eighth = product_thresholds(max(k, 1))
    above = (product > half).to(torch.float64) + (product > quarter) + (product > eighth)
    excess = (x - e0).sum() + (bits - 3 - _FP16_SAFE_LOG2) + above
    p = torch.where(present.all(), excess.clamp(min=0), 0.0)
    return e0 + torch.stack([p + 1, p]).div(2, rounding_mode="floor")  # + [ceil(p / 2), floor(p / 2)]


def _exponents(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[eA, eB]`` (float64, on a's device) of step 1 of the module docstring, computed for both inputs at once:
    a few element-wise kernels on a 2-vector, whatever the inputs' size."""
    return _exponents_from_maxima(torch.stack([_largest_finite(a), _largest_finite(b)]), a.shape[-1])


def range_scale_exponents(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponents ``eA, eB`` of step 1 of the module docstring (float64 0-dim tensors on a's device).

    ``a`` is ``[..., M, K]`` and ``b`` ``[..., K, N]``; only finite values count, so an inf or NaN elsewhere does
    not stop the finite ones from being brought into fp16's range. Negative exponents scale up.
    """
    e = _exponents(a, b)
    return e[0], e[1]


@dataclass(frozen=True)
class _Scales:
    a: torch.Tensor  # [1, 1] float64: dims > 0 so that type promotion computes the product in float64
    b: torch.Tensor
    unscale: torch.Tensor


def _range_scales(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> _Scales | None:
    if dtype != torch.float16 or (a.dtype == torch.float16 and b.dtype == torch.float16):
        return None  # bf16 has fp32's range; fp16 inputs are in range and an fp16 result overflows like theirs
    if a.numel() == 0 or b.numel() == 0:
        return None
    e = _exponents(a, b)
    scales = torch.exp2(-e).reshape(2, 1, 1)
    return _Scales(a=scales[0], b=scales[1], unscale=torch.exp2(e.sum()).reshape(1, 1))


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _to_compute(
    x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, pad_rows: int, pad_cols: int
) -> torch.Tensor:
    """``round(x * scale)`` in ``dtype``, zero-padded on its last two dimensions, in one pass where possible."""
    rows, cols = x.shape[-2], x.shape[-1]
    if _needs_grad(x) or torch.compiler.is_compiling():
        # out= is not differentiable, and Dynamo cannot trace a write into a padded buffer's non-contiguous body:
        # the same values through out-of-place ops.
        y = (x if scale is None else x * scale).to(dtype)
        return F.pad(y, (0, pad_cols, 0, pad_rows)) if pad_rows or pad_cols else y
    if not pad_rows and not pad_cols:
        if scale is None:
            return x.to(dtype)
        return torch.mul(x, scale, out=torch.empty(x.shape, dtype=dtype, device=x.device))
    buffer = torch.empty((*x.shape[:-2], rows + pad_rows, cols + pad_cols), dtype=dtype, device=x.device)
    if pad_rows:
        buffer[..., rows:, :].zero_()
    if pad_cols:
        buffer[..., :rows, cols:].zero_()
    body = buffer[..., :rows, :cols]
    if scale is None:
        body.copy_(x)
    else:
        torch.mul(x, scale, out=body)
    return buffer


def _to_result(
    c: torch.Tensor, unscale: torch.Tensor | None, result_dtype: torch.dtype, out: torch.Tensor | None
) -> torch.Tensor:
    if _needs_grad(c):
        result = (c if unscale is None else c * unscale).to(result_dtype)
        return result if out is None else out.copy_(result)
    if out is None:
        if unscale is None:
            return c.to(result_dtype)
        out = torch.empty(c.shape, dtype=result_dtype, device=c.device)
    if unscale is None:
        return out.copy_(c)
    return torch.mul(c, unscale, out=out)


def _compute(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor | None,
    dtype: torch.dtype,
    padding: MatmulPadding,
    *,
    tensor_cores: bool,
) -> torch.Tensor:
    m, n = a.shape[-2], b.shape[-1]
    scales = _range_scales(a, b, dtype)
    a_low = _to_compute(a, None if scales is None else scales.a, dtype, padding.m, padding.k)
    b_low = _to_compute(b, None if scales is None else scales.b, dtype, padding.k, padding.n)
    if tensor_cores:
        c = torch.matmul(a_low, b_low)
    else:
        c = torch.matmul(a_low.to(torch.float32), b_low.to(torch.float32)).to(dtype)
    if padding.m or padding.n:
        c = c[..., :m, :n]
    return _to_result(c, None if scales is None else scales.unscale, a.dtype, out)


def _reference(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The specification: rounded inputs, exact products, fp32 sums, rounded result, on any device."""
    return _compute(a, b, out, dtype, MatmulPadding(), tensor_cores=False)


def _tensor_core(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    padding = tensor_core_padding(_device_info(a.device), a.shape[-2], b.shape[-1], a.shape[-1], dtype)
    return _compute(a, b, out, dtype, padding, tensor_cores=True)


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def _traced_padding(device: torch.device, m: int, n: int, k: int, dtype: torch.dtype) -> tuple[int, int, int]:
    padding = tensor_core_padding(_device_info(device), m, n, k, dtype)
    return (padding.m, padding.n, padding.k)


def _tensor_core_traced(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``_tensor_core`` as ``torch.compile`` traces it: the padding (a fact of the device) is a graph constant."""
    m, n, k = _traced_padding(a.device, int(a.shape[-2]), int(b.shape[-1]), int(a.shape[-1]), dtype)
    return _compute(a, b, out, dtype, MatmulPadding(m, n, k), tensor_cores=True)


def _native_dtype(call: CallSpec) -> str | None:
    if call.dtype == torch.bfloat16 and call.device.is_cuda and not call.device.supports_bf16:
        # The caller asked for bf16 Tensor Cores by name: running on CUDA cores instead is worth a notice.
        return NoticeReason(f"bfloat16 Tensor Cores need compute capability >= 8.0, {call.device.name} has not")
    return None


class _MatmulFunction(torch.autograd.Function):
    """``A @ B`` by ``MATMUL_OPERATION`` with a backward made of the same range-safe operation."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, backend: str | None) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.dtype = dtype
        ctx.backend = backend
        return _dispatch(a, b, None, dtype, backend)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b = ctx.saved_tensors
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = matmul_tensor_core(grad, b.mT, dtype=ctx.dtype, backend=ctx.backend)
            grad_a = grad_a.sum_to_size(a.shape).to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = matmul_tensor_core(a.mT.to(grad.dtype), grad, dtype=ctx.dtype, backend=ctx.backend)
            grad_b = grad_b.sum_to_size(b.shape).to(b.dtype)
        return grad_a, grad_b, None, None


def _dispatch(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype, backend: str | None
) -> torch.Tensor:
    if not torch.compiler.is_compiling():  # the hot path: the facts object is made once per pair of dtypes
        facts = _call_facts(a.dtype, b.dtype)
        ran: torch.Tensor = MATMUL_OPERATION.run(
            (a, b), a, b, out, dtype, facts=facts, backend=backend, call_dtype=dtype
        )
        return ran
    spec = (MatmulCall, (("a_dtype", a.dtype), ("b_dtype", b.dtype)))
    result: torch.Tensor = dispatch(
        MATMUL_OPERATION, (a, b), a, b, out, dtype, facts=spec, backend=backend, call_dtype=dtype
    )
    return result


MATMUL_OPERATION = Operation("tensorcore.matmul", _reference, aliases=("matmul_tensor_core",))
MATMUL_OPERATION.register(
    "tensor_core",
    _tensor_core,
    priority=10,
    devices={"cuda"},
    checks=[requires_min_capability(7, 0), _native_dtype],
    traced=_tensor_core_traced,
)


def _result_shape(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    for name, t in (("A", a), ("B", b)):
        if t.dim() < 2:
            raise ConfigurationError(
                f"expected {name} with at least 2 dimensions ([..., M, K] for A, [..., K, N] for B), got shape "
                f"{format_shape(t.shape)}; add a dimension with {name}.unsqueeze(0) or .unsqueeze(-1)"
            )
    if a.shape[-1] != b.shape[-2]:
        raise ConfigurationError(
            f"expected B of shape [..., K, N] with K = A.shape[-1] = {a.shape[-1]}, got A {format_shape(a.shape)} "
            f"and B {format_shape(b.shape)}"
        )
    if a.shape[:-2] == b.shape[:-2]:  # the common case, without broadcast_shapes' tens of microseconds
        return (*a.shape[:-2], a.shape[-2], b.shape[-1])
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])  # type: ignore[no-untyped-call]
    except RuntimeError as exc:
        raise ConfigurationError(
            f"expected broadcastable batch dimensions, got A {format_shape(a.shape)} and B {format_shape(b.shape)}"
        ) from exc
    return (*batch, a.shape[-2], b.shape[-1])


def matmul_tensor_core(
    A: torch.Tensor,
    B: torch.Tensor,
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float16,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``A @ B`` multiplied on Tensor Cores in ``dtype`` (float16 or bfloat16), returned in A's dtype.

    ``A [..., M, K]`` and ``B [..., K, N]`` may be float16, bfloat16, float32 or float64 and may have batch
    dimensions that broadcast; the result is ``[..., M, N]`` in A's dtype, written into ``out`` when given
    (``out`` must have that shape and dtype). fp32 values beyond fp16's range are scaled by powers of two, never
    turned into inf: see the module docstring for exactly what is computed. Without a GPU the same numbers are
    computed on the CPU. ``backend`` forces an implementation (``"fused"``, ``"tensor_core"`` or ``"reference"``).

    Raises ``TypeError`` for a non-tensor, :class:`~llamatelemetry_core.errors.ConfigurationError` for bad
    shapes, dtypes or devices, and :class:`~llamatelemetry_core.errors.BackendUnavailableError` when the
    requested ``backend`` cannot run here. bfloat16 on a GPU without it (T4) runs the reference on the GPU's
    CUDA cores with a ``BackendFallbackWarning``.
    """
    check_tensor(A, "A")
    check_tensor(B, "B")
    check_dtype(A, _INPUT_DTYPES, "A")
    check_dtype(B, _INPUT_DTYPES, "B")
    if dtype not in _COMPUTE_DTYPES:
        raise ConfigurationError(
            f"expected dtype to be torch.float16 or torch.bfloat16 (the Tensor Core input types), got {dtype!r}; "
            "for float32 on Tensor Cores use torch.matmul under enable_tensor_cores(allow_tf32=True)"
        )
    shape = _result_shape(A, B)
    tensors = {"A": A, "B": B}
    if out is not None:
        check_tensor(out, "out")
        tensors["out"] = out
        if tuple(out.shape) != shape or out.dtype != A.dtype:
            raise ConfigurationError(
                f"expected out of shape {format_shape(shape)} and dtype {dtype_name(A.dtype)} (A's), got "
                f"{format_shape(out.shape)} {dtype_name(out.dtype)}; allocate it with torch.empty(shape, dtype=A.dtype)"
            )
    check_same_device(tensors)
    if _needs_grad(A, B):
        result: torch.Tensor = _MatmulFunction.apply(A, B, dtype, backend)  # type: ignore[no-untyped-call]
        return result if out is None else out.copy_(result)
    return _dispatch(A, B, out, dtype, backend)
