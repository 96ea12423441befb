"""The ``paged_attention`` operation: its implementations, what each supports, and the report of what runs here.

=============  ========  ===================================================================================
name           priority  supports
=============  ========  ===================================================================================
``triton``     350       the Triton kernels of :mod:`.paged_kernel`, SM >= 7.5 (or the interpreter on CPU):
                         fp16/bf16 queries (fp16/fp32 in the interpreter, which has no bf16), KV stored in
                         q's dtype or int8, or fp8 e4m3 on SM >= 8.9; head dims <= 256; any page size
``reference``  lowest    :func:`~.paged_reference.paged_attention_reference`: everything, O(n^2) memory
=============  ========  ===================================================================================

fp8 (e4m3) storage needs a GPU with fp8 conversions (compute capability >= 8.9: Ada, Hopper): on older GPUs,
a T4 among them, :func:`~llamatelemetry_flashattn.paged_attention` refuses it before dispatch with
:class:`~llamatelemetry_core.errors.CapabilityError` (int8 storage saves the same memory there); on CPU the
reference dequantizes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.interpreter import triton_launch_guard
from llamatelemetry_core.kernel_checks import bf16_on_device, kernel_dtypes, register_triton_kernel
from llamatelemetry_core.selection import CallSpec, Operation
from llamatelemetry_flashattn.paged_reference import paged_attention_reference
from llamatelemetry_flashattn.tiles import MAX_HEAD_DIM

__all__ = [
    "PAGED_ATTENTION",
    "PAGED_OPERATION_NAME",
    "PagedAttentionCall",
    "PagedBackendReport",
    "kv_dtype_unsupported_reason",
    "paged_backend_report",
]

PAGED_OPERATION_NAME = "flashattn.paged_attention"
_FP8 = getattr(torch, "float8_e4m3fn", None)


@dataclass(frozen=True)
class PagedAttentionCall:
    """The facts of one paged attention call that implementations check (``CallSpec.facts``)."""

    batch: int
    num_tokens: int
    max_seqlen_q: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    kv_dtype: torch.dtype
    causal: bool
    window_size: tuple[int, int] | None
    softcap: float | None


# ``doctor`` asks about a "typical call" without facts: a decode step, head dim 128, KV in q's dtype.
_TYPICAL_HEAD_DIM = 128


def kv_dtype_unsupported_reason(device: DeviceInfo, kv_dtype: torch.dtype) -> str | None:
    """Why KV stored as ``kv_dtype`` cannot be read on ``device`` at all (``None``: it can)."""
    if _FP8 is not None and kv_dtype == _FP8 and device.is_cuda and not device.supports_fp8:
        cc = device.compute_capability
        sm = "unknown" if cc is None else f"sm_{cc[0]}{cc[1]}"
        return (
            f"fp8 (float8_e4m3fn) KV storage needs a GPU with fp8 conversions (compute capability >= 8.9: Ada, "
            f"Hopper or newer); {device.name} is {device.architecture} ({sm}). Store the cache as int8 (per-token "
            "scales, the same memory) or in fp16"
        )
    return None


def _kv_dtype(call: CallSpec) -> str | None:
    facts = call.facts_as(PagedAttentionCall)
    kv_dtype = call.dtype if facts is None else facts.kv_dtype
    if kv_dtype is None:
        return None
    if kv_dtype == _FP8 and not call.device.is_cuda:
        return "reads no fp8 KV in the Triton interpreter (NumPy has no float8)"
    return kv_dtype_unsupported_reason(call.device, kv_dtype)


def _head_dim(call: CallSpec) -> str | None:
    facts = call.facts_as(PagedAttentionCall)
    head_dim = _TYPICAL_HEAD_DIM if facts is None else facts.head_dim
    return None if head_dim <= MAX_HEAD_DIM else f"supports head dims <= {MAX_HEAD_DIM}, not {head_dim}"


def _triton_impl(q: torch.Tensor, *args: Any, **options: Any) -> torch.Tensor:
    """:func:`~.paged_kernel.triton_paged_attention`: the arguments of
    :func:`~llamatelemetry_flashattn.paged_attention`, as it checked them."""
    from llamatelemetry_flashattn.paged_kernel import triton_paged_attention

    with triton_launch_guard(q.device):  # the interpreter runs one launch at a time
        return triton_paged_attention(q, *args, **options)


def _reference_impl(*args: Any, out: torch.Tensor | None, **options: Any) -> torch.Tensor:
    """:func:`~.paged_reference.paged_attention_reference`, written into ``out`` when one is given."""
    result = paged_attention_reference(*args, **options)
    return result if out is None else out.copy_(result)


PAGED_ATTENTION = Operation(PAGED_OPERATION_NAME, _reference_impl, aliases=("paged_attention",))
register_triton_kernel(
    PAGED_ATTENTION,
    _triton_impl,
    kernel_dtypes(what="query dtypes"),
    bf16_on_device,
    _kv_dtype,
    _head_dim,
    priority=350,
)


@dataclass(frozen=True)
class PagedBackendReport:
    """One implementation of ``paged_attention`` and whether it runs a typical call on a device."""

    name: str
    priority: int
    runs: bool
    reason: str | None
    selected: bool


def paged_backend_report(
    device: DeviceInfo | None = None,
    *,
    dtype: torch.dtype | None = None,
    kv_dtype: torch.dtype | None = None,
    head_dim: int = 128,
) -> list[PagedBackendReport]:
    """Every paged attention implementation, best first, with whether it runs a typical decode step here.

    ``dtype`` is the queries' (fp16 on a GPU, fp32 on CPU by default), ``kv_dtype`` the storage's (default: the
    queries' dtype; ``torch.int8`` or ``torch.float8_e4m3fn`` for quantized caches). ``device`` may be simulated.
    """
    info = device if device is not None else get_device_info()
    if dtype is None:
        dtype = torch.float16 if info.is_cuda else torch.float32
    facts = PagedAttentionCall(
        batch=1,
        num_tokens=1,
        max_seqlen_q=1,
        num_heads=32,
        num_kv_heads=8,
        head_dim=head_dim,
        page_size=16,
        kv_dtype=kv_dtype if kv_dtype is not None else dtype,
        causal=True,
        window_size=None,
        softcap=None,
    )
    candidates = PAGED_ATTENTION.explain(CallSpec(device=info, dtype=dtype, facts=facts))
    chosen = next((c.name for c in candidates if c.reason is None), None)
    return [PagedBackendReport(c.name, c.priority, c.reason is None, c.reason, c.name == chosen) for c in candidates]
