"""The ``flash_attention`` operation: every implementation, what each supports, and the report of what runs here.

Implementations, fastest first (the core selection policy runs the first that supports the call):

=================  ========  ==============================================================================
name               priority  supports
=================  ========  ==============================================================================
``flash_attn``     500       the flash-attn package (FlashAttention-2), SM >= 8.0, fp16/bf16, head dim <= 256:
                             everything (causal, GQA, window, softcap, dropout, q_len != kv_len)
``sdpa_cudnn``     400       PyTorch SDPA forced to cuDNN, SM >= 8.0, fp16/bf16, head dim <= 128, no GQA
``triton``         350       our Triton kernel (:mod:`.triton_kernel`), SM >= 7.5 (or the interpreter on CPU):
                             causal, GQA, window, softcap, q_len != kv_len; forward only, no dropout
``sdpa_flash``     300       PyTorch SDPA forced to its FlashAttention-2 kernel, SM >= 8.0, fp16/bf16, GQA
``sdpa_efficient`` 100       PyTorch SDPA forced to its memory-efficient kernel (the fused one a T4 has);
                             window and end-aligned causal masks as an explicit mask
``sdpa_cpu``       50        PyTorch SDPA on CPU (its flash-CPU or math kernel), explicit masks
``reference``      lowest    :func:`~.reference.attention_reference`: everything, O(n^2) memory
=================  ========  ==============================================================================

SDPA's ``is_causal`` aligns the mask to the top-left, FlashAttention's to the bottom-right; the two agree when
``q_len == kv_len``, and a single query (decode) sees every key under both if it is passed as non-causal.
Every other causal or windowed call either goes to an SDPA backend that takes an explicit boolean mask (built
bottom-right aligned) or to another implementation. SDPA's fused kernels do not softcap: those calls go
elsewhere. A query that sees no key at all (``q_len > kv_len`` under causal masking) is defined as zero, which
SDPA's masked kernels do not promise: such calls go elsewhere too.

The order is measured, not assumed: on an H100 (torch 2.11, ``benchmarks/flashattn``) cuDNN leads at 330-590
TFLOP/s, our Triton kernel follows at 260-450 (and reads a decode step's K/V at ~2.8 TB/s), ahead of SDPA's
flash (210-310) and memory-efficient (100-165) kernels; on a T4 only the last of those exists.

A check's reason is what ``llamatelemetry doctor`` prints and what ``BackendUnavailableError`` says.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.environment import flash_attn_status, sdpa_backend_status
from llamatelemetry_core.errors import BackendUnavailableError
from llamatelemetry_core.interpreter import triton_launch_guard
from llamatelemetry_core.kernel_checks import bf16_on_device, kernel_dtypes, register_triton_kernel
from llamatelemetry_core.selection import (
    CallSpec,
    Check,
    Operation,
    QuietReason,
    requires_dtypes,
    requires_min_capability,
    requires_module,
)
from llamatelemetry_flashattn._special import propagate_query_nan
from llamatelemetry_flashattn.reference import attention_reference, normalize_window, visibility_mask
from llamatelemetry_flashattn.tiles import MAX_HEAD_DIM

__all__ = [
    "ATTENTION",
    "OPERATION_NAME",
    "AttentionCall",
    "BackendReport",
    "attention_backend_report",
]

OPERATION_NAME = "flashattn.attention"
_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionCall:
    """The facts of one attention call that implementations check (``CallSpec.facts``)."""

    batch: int
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    window_size: tuple[int, int] | None
    softcap: float | None
    dropout_p: float
    needs_grad: bool

    def selection_class(self) -> tuple[object, ...]:
        """What the implementations' checks read: every fact, but of the lengths only how they compare (a decode
        loop's growing ``kv_len`` keeps its chosen implementation)."""
        lengths = (self.q_len == 1, self.q_len == self.kv_len, self.q_len > self.kv_len, self.kv_len == 0)
        return (
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.causal,
            self.window_size,
            self.softcap,
            self.dropout_p,
            self.needs_grad,
            lengths,
        )


# ``doctor`` asks about a "typical call" without facts: a causal prefill, head dim 64, no extras.
_TYPICAL = AttentionCall(1, 1, 1, 1, 1, 64, True, None, None, 0.0, False)


def _facts(call: CallSpec) -> AttentionCall:
    return call.facts_as(AttentionCall) or _TYPICAL


def _head_dim(call: CallSpec) -> int:
    return _facts(call).head_dim


def _masked(call: CallSpec) -> bool:
    """True when the call needs a mask that SDPA's ``is_causal`` cannot express."""
    facts = _facts(call)
    if facts.window_size is not None:
        return True
    return facts.causal and facts.q_len != facts.kv_len and facts.q_len != 1


def _has_empty_rows(call: CallSpec) -> bool:
    """Some query sees no key: when there is no key, or more queries than keys and a mask limits them."""
    facts = _facts(call)
    if facts.kv_len == 0 and facts.q_len > 0:
        return True
    left, right = normalize_window(facts.window_size, facts.causal)
    return facts.q_len > facts.kv_len and (right != -1 or left != -1)


def _head_dim_check(limit: int, multiple: int = 8) -> Check:
    def check(call: CallSpec) -> str | None:
        d = _head_dim(call)
        if d > limit or d % multiple:
            return f"supports head dims <= {limit} that are multiples of {multiple}, not {d}"
        return None

    return check


def _no_softcap(call: CallSpec) -> str | None:
    return "has no logit softcap" if _facts(call).softcap is not None else None


def _no_dropout(call: CallSpec) -> str | None:
    return "has no dropout" if _facts(call).dropout_p > 0.0 else None


def _no_gqa(call: CallSpec) -> str | None:
    heads, kv_heads = _facts(call).num_heads, _facts(call).num_kv_heads
    return f"needs as many k/v heads as q heads, got {kv_heads} for {heads}" if heads != kv_heads else None


def _no_mask(call: CallSpec) -> str | None:
    if _facts(call).window_size is not None:
        return "takes no sliding window (its is_causal is the only mask it accepts)"
    if _masked(call):
        return (
            "aligns is_causal to the top-left: a causal call with q_len != kv_len (and q_len > 1) needs a mask it "
            "does not take"
        )
    return None


def _no_empty_rows(call: CallSpec) -> str | None:
    if _has_empty_rows(call):
        return "does not define the output of a query that sees no key (no keys, or q_len > kv_len under a mask)"
    return None


def _forward_only(call: CallSpec) -> str | None:
    return "is forward-only (no backward kernel); inputs require grad" if _facts(call).needs_grad else None


@functools.cache
def _sdpa_status(index: int | None) -> dict[str, str | None]:
    device = get_device_info(torch.device("cuda", index) if index is not None else "cpu", refresh_memory=False)
    return sdpa_backend_status(device)


def _sdpa_runs(backend: str) -> Check:
    """The SDPA backend runs on this GPU at all (probed once per device; simulated devices are not probed)."""

    def check(call: CallSpec) -> str | None:
        if call.device.simulated or not call.device.is_cuda:
            return None
        reason = _sdpa_status(call.device.index)[backend]
        return None if reason is None else f"PyTorch's {backend} SDPA backend does not run here: {reason}"

    return check


_flash_attn_capability = requires_min_capability(8, 0)


def _flash_attn_runs_on_this_gpu(call: CallSpec) -> str | None:
    """flash-attn 2 needs Ampere or newer. Checked before the package, so that a T4 is never told to install it;
    quiet where the package is absent (nothing was tried), a warning where it is installed but cannot run."""
    reason = _flash_attn_capability(call)
    if reason is None:
        return None
    return reason if importlib.util.find_spec("flash_attn") is not None else QuietReason(reason)


def _flash_attn_usable(call: CallSpec) -> str | None:
    status = flash_attn_status(call.device)
    return None if status.usable else status.reason


def _flash_attn_softcap(call: CallSpec) -> str | None:
    if _facts(call).softcap is None:
        return None
    module = importlib.import_module("flash_attn")
    if "softcap" not in inspect.signature(module.flash_attn_func).parameters:
        return "this flash-attn version has no softcap (needs flash-attn >= 2.6)"
    return None


# --- implementations ---------------------------------------------------------------------------------------------


def _bhsd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def _expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, H_kv, D] -> [B, S, H, D] by repeating each KV head for its group of query heads."""
    kv_heads = t.shape[2]
    return t if kv_heads == heads else t.repeat_interleave(heads // kv_heads, dim=2)


# ``enable_gqa`` arrived in torch 2.5; before it, grouped KV heads are repeated.
_HAS_ENABLE_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


# SDPA kernels that turn a non-finite query row into a NaN output row by themselves on a GPU (no mask).
_NATIVE_NAN_SDPA = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)


def _run_sdpa(
    backend: SDPBackend | None,
    gqa: str,
    allow_mask: bool,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float | None,
    window_size: tuple[int, int] | None,
    softcap: float | None,
    dropout_p: float,
) -> torch.Tensor:
    """PyTorch SDPA through ``backend`` (``None``: its own choice, on CPU); grouped KV heads passed natively
    (``gqa="native"``) or repeated (``"expand"``); ``allow_mask``: the backend takes an explicit mask. Bound to
    those three with :func:`functools.partial`, it is an implementation (the checks keep softcap away)."""
    del softcap
    heads, kv_heads = q.shape[2], k.shape[2]
    kwargs: dict[str, Any] = {}
    if heads != kv_heads:
        if gqa == "native" and _HAS_ENABLE_GQA:
            kwargs["enable_gqa"] = True
        else:
            k, v = _expand_kv(k, heads), _expand_kv(v, heads)
    q_len, kv_len = q.shape[1], k.shape[1]
    mask = None
    is_causal = causal and q_len > 1
    if window_size is not None or (is_causal and q_len != kv_len):
        assert allow_mask, "checks route masked calls away from this backend"
        mask = visibility_mask(q_len, kv_len, causal=causal, window_size=window_size, device=q.device)
        is_causal = False
    try:
        if backend is None:
            out = F.scaled_dot_product_attention(
                _bhsd(q),
                _bhsd(k),
                _bhsd(v),
                attn_mask=mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=softmax_scale,
                **kwargs,
            )
        else:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(
                    _bhsd(q),
                    _bhsd(k),
                    _bhsd(v),
                    attn_mask=mask,
                    dropout_p=dropout_p,
                    is_causal=is_causal,
                    scale=softmax_scale,
                    **kwargs,
                )
    except RuntimeError as exc:
        if "No available kernel" not in str(exc):
            raise
        raise BackendUnavailableError(
            f"{OPERATION_NAME}: PyTorch's SDPA {backend} rejected this call: {str(exc).splitlines()[0]}",
            operation=OPERATION_NAME,
            backend=str(backend),
        ) from exc
    native = mask is None and backend in _NATIVE_NAN_SDPA  # measured without masks (probe_dispatch_cost.py)
    return propagate_query_nan(
        q, out.transpose(1, 2), causal=causal, window_size=window_size, kv_len=kv_len, native_on_cuda=native
    )


def _flash_attn_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float | None,
    window_size: tuple[int, int] | None,
    softcap: float | None,
    dropout_p: float,
) -> torch.Tensor:
    from flash_attn import flash_attn_func

    kwargs: dict[str, Any] = {"window_size": window_size if window_size is not None else (-1, -1)}
    if softcap is not None:
        kwargs["softcap"] = softcap
    out: torch.Tensor = flash_attn_func(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, **kwargs
    )
    return propagate_query_nan(q, out, causal=causal, window_size=window_size, kv_len=k.shape[1])


def _triton_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    softmax_scale: float | None,
    window_size: Sequence[int] | None,
    softcap: float | None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Our Triton kernel; also, as the custom op ``_triton_op``, one graph node for ``torch.compile`` (forward
    only: the checks route autograd and dropout away). The op hands ``window_size`` over as a list."""
    from llamatelemetry_flashattn.triton_kernel import triton_attention

    del dropout_p  # the check keeps dropout away from this kernel
    window = None if window_size is None else (window_size[0], window_size[1])
    with triton_launch_guard(q.device):  # the interpreter runs one launch at a time
        out = triton_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, window_size=window, softcap=softcap)
    return propagate_query_nan(
        q, out, causal=causal, window_size=window, kv_len=k.shape[1], native_on_cuda=window is None
    )


_triton_op = torch.library.custom_op("llamatelemetry::flashattn_triton", mutates_args=())(_triton_impl)


@_triton_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: object, **options: object) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


ATTENTION = Operation(OPERATION_NAME, attention_reference, aliases=("flash_attention",))
ATTENTION.register(
    "flash_attn",
    _flash_attn_impl,
    priority=500,
    devices={"cuda"},
    checks=[
        _flash_attn_runs_on_this_gpu,
        # flash-attn builds against the installed torch (hence no build isolation); this command works whether
        # llamatelemetry came from a package index or from a clone, where the component's extra cannot resolve.
        requires_module("flash_attn", "pip install flash-attn --no-build-isolation", optional=True),
        _flash_attn_usable,
        _no_empty_rows,
        requires_dtypes(*_HALF),
        _head_dim_check(MAX_HEAD_DIM),
        _flash_attn_softcap,
    ],
)
ATTENTION.register(
    "sdpa_cudnn",
    functools.partial(_run_sdpa, SDPBackend.CUDNN_ATTENTION, "expand", False),
    priority=400,
    devices={"cuda"},
    checks=[
        requires_min_capability(8, 0),
        requires_dtypes(*_HALF),
        _head_dim_check(128),
        _no_gqa,
        _no_mask,
        _no_empty_rows,
        _no_softcap,
        _no_dropout,
        _sdpa_runs("cudnn"),
    ],
)
ATTENTION.register(
    "sdpa_flash",
    functools.partial(_run_sdpa, SDPBackend.FLASH_ATTENTION, "native", False),
    priority=300,
    devices={"cuda"},
    checks=[
        requires_min_capability(8, 0),
        requires_dtypes(*_HALF),
        _head_dim_check(MAX_HEAD_DIM),
        _no_mask,
        _no_empty_rows,
        _no_softcap,
        _sdpa_runs("flash"),
    ],
)
register_triton_kernel(
    ATTENTION,
    _triton_impl,
    kernel_dtypes(),
    bf16_on_device,
    _head_dim_check(MAX_HEAD_DIM, multiple=1),
    _no_dropout,
    _forward_only,
    priority=350,
    traced=_triton_op,
)
ATTENTION.register(
    "sdpa_efficient",
    functools.partial(_run_sdpa, SDPBackend.EFFICIENT_ATTENTION, "expand", True),
    priority=100,
    devices={"cuda"},
    checks=[
        requires_min_capability(5, 0),
        requires_dtypes(*_HALF, torch.float32),
        bf16_on_device,
        _head_dim_check(MAX_HEAD_DIM),
        _no_softcap,
        _no_empty_rows,
        _sdpa_runs("efficient"),
    ],
)
ATTENTION.register(
    "sdpa_cpu",
    functools.partial(_run_sdpa, None, "native", True),
    priority=50,
    devices={"cpu"},
    checks=[
        requires_dtypes(*_HALF, torch.float32, torch.float64),
        _no_softcap,
        _no_empty_rows,
    ],
)


@dataclass(frozen=True)
class BackendReport:
    """One implementation of ``flash_attention`` and whether it runs a typical call on a device."""

    name: str
    priority: int
    runs: bool
    reason: str | None
    selected: bool


def attention_backend_report(
    device: DeviceInfo | str | torch.device | int | None = None,
    *,
    dtype: torch.dtype | None = None,
    head_dim: int = 64,
    causal: bool = True,
    seq_len: int = 2048,
) -> list[BackendReport]:
    """Every attention implementation, best first, with whether it runs a typical call here and why not.

    The typical call is a prefill of ``seq_len`` tokens, ``head_dim`` wide, in ``dtype`` (fp16 on a GPU, fp32
    on CPU by default). ``device`` may be a simulated one (``simulate_device("t4")``). The first entry that runs
    is the one :func:`~llamatelemetry_flashattn.flash_attention_forward` would choose (``selected``); a device
    name (``"cpu"``, ``"cuda:0"``), ``torch.device`` or CUDA index is looked up with ``get_device_info``.
    """
    given: object = device  # validated at run time whatever the annotation says
    if isinstance(given, DeviceInfo):
        info = given
    elif given is None or (isinstance(given, str | torch.device | int) and not isinstance(given, bool)):
        info = get_device_info(given)
    else:
        raise TypeError(
            f"expected device to be a DeviceInfo, a device name, a torch.device, a CUDA index or None, got "
            f"{type(device).__name__}"
        )
    if dtype is None:
        dtype = torch.float16 if info.is_cuda else torch.float32
    shape = AttentionCall(
        batch=1,
        q_len=seq_len,
        kv_len=seq_len,
        num_heads=8,
        num_kv_heads=8,
        head_dim=head_dim,
        causal=causal,
        window_size=None,
        softcap=None,
        dropout_p=0.0,
        needs_grad=False,
    )
    call = CallSpec(device=info, dtype=dtype, facts=shape)
    candidates = ATTENTION.explain(call)
    chosen = next((c.name for c in candidates if c.reason is None), None)
    return [BackendReport(c.name, c.priority, c.reason is None, c.reason, c.name == chosen) for c in candidates]
