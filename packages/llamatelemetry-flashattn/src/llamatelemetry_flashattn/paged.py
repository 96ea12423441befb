"""``paged_attention`` and ``paged_decode``: attention that reads a paged KV cache, and their input checks.

The cache is described by :mod:`llamatelemetry_core.kv_layout` (one layer's :class:`PagedKV`, block tables,
sequence lengths, packed queries); whoever writes it (``llamatelemetry-kvcache``, an engine, a test) and this
module agree only through that layout.
"""

from __future__ import annotations

import torch

from llamatelemetry_core.device import get_device_info
from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_core.kv_layout import QUANTIZED_KV_DTYPES, PagedKV, PagedKVLayout
from llamatelemetry_core.selection import CallSpec
from llamatelemetry_core.validation import (
    check_dtype,
    check_ndim,
    check_non_negative_int,
    check_same_device,
    check_tensor,
    dtype_name,
    format_shape,
)
from llamatelemetry_flashattn.config import check_softcap, check_softmax_scale, check_window_size
from llamatelemetry_flashattn.paged_backends import PAGED_ATTENTION, PagedAttentionCall, kv_dtype_unsupported_reason

__all__ = ["paged_attention", "paged_decode", "selected_paged_backend"]

_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = (*_GPU_DTYPES, torch.float64)
_Q_LAYOUT = "[num_tokens, num_heads, head_dim]"


def _check_metadata(tensor: object, name: str, shape: tuple[int | None, ...], layout: str) -> torch.Tensor:
    t = check_tensor(tensor, name)
    if t.dtype != torch.int32:
        raise ConfigurationError(
            f"expected {name} with dtype int32 (the layout's metadata type), got {dtype_name(t.dtype)}; "
            f"convert it once per step with {name}.to(torch.int32)"
        )
    ok = t.dim() == len(shape) and all(e is None or e == s for e, s in zip(shape, t.shape, strict=False))
    if not ok:
        raise ConfigurationError(
            f"expected {name} of shape {layout} = {format_shape(shape)}, got {format_shape(t.shape)}"
        )
    return t


def _check_values_on_cpu(
    layout: PagedKVLayout,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    num_tokens: int,
    max_seqlen_q: int,
) -> None:
    """Checks that read metadata values: cheap on CPU tensors; on a GPU they would synchronise, so they are skipped."""
    cu = cu_seqlens_q.long()
    q_lens = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != num_tokens or bool((q_lens < 0).any()):
        raise ConfigurationError(
            f"expected cu_seqlens_q to rise from 0 to num_tokens = {num_tokens} (row offsets of each sequence's "
            f"queries), got {cu.tolist()}"
        )
    if q_lens.numel() and int(q_lens.max()) > max_seqlen_q:
        i = int(q_lens.argmax())
        raise ConfigurationError(
            f"expected max_seqlen_q >= every sequence's query count, got max_seqlen_q={max_seqlen_q} but sequence "
            f"{i} has {int(q_lens[i])} queries; pass the longest query count of the step"
        )
    lens = seq_lens.long()
    capacity = block_tables.shape[1] * layout.page_size
    bad = ((lens < 0) | (lens > capacity)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ConfigurationError(
            f"expected 0 <= seq_lens[i] <= {capacity} (block_tables has {block_tables.shape[1]} blocks of "
            f"{layout.page_size} tokens per sequence), got seq_lens[{i}] = {int(lens[i])}"
        )
    short = ((q_lens > lens) & (lens > 0)).nonzero()
    if short.numel():
        i = int(short[0, 0])
        raise ConfigurationError(
            f"sequence {i} has {int(q_lens[i])} queries but only {int(lens[i])} tokens in the cache; seq_lens "
            "counts the cached tokens including this step's (write the new K/V first)"
        )
    used = torch.arange(block_tables.shape[1])[None, :] * layout.page_size < lens[:, None]
    blocks = block_tables.long()
    wrong = (used & ((blocks < 0) | (blocks >= layout.num_blocks))).nonzero()
    if wrong.numel():
        i, j = (int(x) for x in wrong[0])
        raise ConfigurationError(
            f"expected block numbers in [0, {layout.num_blocks}) for the blocks a sequence uses, got "
            f"block_tables[{i}, {j}] = {int(blocks[i, j])}"
        )


def _validate(
    q: torch.Tensor,
    kv: PagedKV,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    out: torch.Tensor | None,
) -> PagedKVLayout:
    check_tensor(q, "q")
    check_ndim(q, 3, "q", layout=_Q_LAYOUT)
    if not isinstance(kv, PagedKV):
        raise TypeError(
            "expected kv to be a llamatelemetry_core.kv_layout.PagedKV (one layer's paged store), got "
            f"{type(kv).__name__}"
        )
    layout = kv.validate()
    num_tokens, heads, head_dim = q.shape
    batch = _check_metadata(block_tables, "block_tables", (None, None), "[batch, max_blocks_per_seq]").shape[0]
    _check_metadata(seq_lens, "seq_lens", (batch,), "[batch]")
    _check_metadata(cu_seqlens_q, "cu_seqlens_q", (batch + 1,), "[batch + 1]")
    device = check_same_device(
        {
            "q": q,
            "kv.key_cache": kv.key_cache,
            "block_tables": block_tables,
            "seq_lens": seq_lens,
            "cu_seqlens_q": cu_seqlens_q,
        }
    )
    allowed = _CPU_DTYPES if device.type == "cpu" else _GPU_DTYPES
    check_dtype(q, allowed, "q", hint="GPUs run fp16 or bf16: convert with q.half()")
    if layout.dtype != q.dtype and layout.dtype not in QUANTIZED_KV_DTYPES:
        raise ConfigurationError(
            f"expected KV stored in q's dtype ({dtype_name(q.dtype)}) or quantized (int8, float8_e4m3fn), got "
            f"{dtype_name(layout.dtype)}; convert q or the cache so that they match"
        )
    if head_dim != layout.head_dim or heads % layout.num_kv_heads:
        raise ConfigurationError(
            f"expected q of shape {_Q_LAYOUT} = [*, H, {layout.head_dim}] with H % num_kv_heads == 0 "
            f"(num_kv_heads = {layout.num_kv_heads}), got {format_shape(q.shape)}"
        )
    check_non_negative_int(max_seqlen_q, "max_seqlen_q")
    if num_tokens and not max_seqlen_q:
        raise ConfigurationError(f"expected max_seqlen_q >= 1 for {num_tokens} query rows, got 0")
    if out is not None:
        check_tensor(out, "out")
        if tuple(out.shape) != tuple(q.shape) or out.dtype != q.dtype or out.device != q.device:
            raise ConfigurationError(
                f"expected out of shape {format_shape(q.shape)}, dtype {dtype_name(q.dtype)} on {q.device} (like "
                f"q), got {format_shape(out.shape)} {dtype_name(out.dtype)} on {out.device}"
            )
        if out.stride(-1) != 1:
            raise ConfigurationError("expected out with a contiguous last dimension (stride 1); pass a contiguous out")
    reason = kv_dtype_unsupported_reason(get_device_info(device, refresh_memory=False), layout.dtype)
    if reason is not None:
        raise CapabilityError(reason)
    if device.type == "cpu":
        _check_values_on_cpu(layout, block_tables, seq_lens, cu_seqlens_q, num_tokens, max_seqlen_q)
    return layout


def _facts(
    q: torch.Tensor,
    layout: PagedKVLayout,
    batch: int,
    max_seqlen_q: int,
    causal: bool,
    window_size: tuple[int, int] | None,
    softcap: float | None,
) -> PagedAttentionCall:
    """What the implementations' checks read of a call (its inputs already checked)."""
    return PagedAttentionCall(
        batch=batch,
        num_tokens=q.shape[0],
        max_seqlen_q=max_seqlen_q,
        num_heads=q.shape[1],
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        page_size=layout.page_size,
        kv_dtype=layout.dtype,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
    )


def paged_attention(
    q: torch.Tensor,
    kv: PagedKV,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    max_seqlen_q: int,
    softmax_scale: float | None = None,
    causal: bool = True,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Exact attention of packed queries over one layer's paged KV cache (decode and chunked prefill alike).

    * ``q``: ``[num_tokens, num_heads, head_dim]``, fp16/bf16 on GPUs (fp32 runs the reference), also fp32/fp64
      on CPU. Rows ``cu_seqlens_q[i] .. cu_seqlens_q[i + 1] - 1`` are sequence ``i``'s queries: its *last*
      tokens, already written to the cache.
    * ``kv``: a :class:`~llamatelemetry_core.kv_layout.PagedKV`, stored in q's dtype or quantized (int8; fp8
      e4m3 on GPUs of compute capability >= 8.9) with float32 scales per token and head, dequantized in the kernel.
      ``num_heads % num_kv_heads == 0`` (grouped-query attention, any ratio).
    * ``block_tables`` int32 ``[batch, max_blocks_per_seq]``, ``seq_lens`` int32 ``[batch]`` (tokens in the cache,
      this step's included), ``cu_seqlens_q`` int32 ``[batch + 1]``: the step's metadata, shared by every layer.
    * ``max_seqlen_q``: the largest query count of any sequence, a host int (it sizes the launch without reading
      the device; 1 for decode).
    * ``causal`` (aligned to the end), ``window_size=(left, right)`` (``-1`` unbounded), ``softcap``,
      ``softmax_scale`` (default ``1 / sqrt(head_dim)``): as :func:`~llamatelemetry_flashattn.flash_attention_forward`.
    * ``out``: written in place and returned when given (``q``'s shape and dtype).
    * ``backend``: ``"triton"`` or ``"reference"`` (also ``LLAMATELEMETRY_BACKEND``); default: the best that runs.

    A sequence with ``seq_lens[i] == 0`` is padding: its query rows get zeros. The Triton path reads no device
    value on the host and allocates only by shape, so a call can be captured in a CUDA graph (make one call with
    the same shapes before capturing: the first compiles the kernel and probes Triton); the checks that
    read metadata values (``cu_seqlens_q`` rising to ``num_tokens``, ``seq_lens`` within the block table,
    block numbers in range) run only for CPU tensors, where they cost no synchronisation.

    Raises ``ConfigurationError`` (a ``ValueError``) for invalid shapes, dtypes, devices or metadata,
    ``TypeError`` when ``kv`` is not a ``PagedKV``, ``CapabilityError`` for fp8 storage on a GPU without fp8,
    and ``BackendUnavailableError`` when a requested backend cannot run the call. Which implementation ran:
    ``llamatelemetry_core.selection.last_selection("flashattn.paged_attention")``.
    """
    if torch.compiler.is_compiling() and isinstance(kv, PagedKV):
        # Dynamo cannot trace the checks that read metadata values nor the selection machinery: the whole call is
        # one custom op of the graph, whose body is this function run eagerly (checks, then the implementation
        # selected at run time, so LLAMATELEMETRY_BACKEND and backend= are honoured as they are eagerly).
        left, right = (-2, -2) if window_size is None else window_size
        traced: torch.Tensor = _paged_attention_op(
            q, kv.key_cache, kv.value_cache, kv.key_scale, kv.value_scale, block_tables, seq_lens, cu_seqlens_q,
            max_seqlen_q, softmax_scale, causal, left, right, softcap, backend or "",
        )  # fmt: skip
        return traced if out is None else out.copy_(traced)
    if not isinstance(causal, bool):
        raise ConfigurationError(f"expected causal to be True or False, got {causal!r}")
    layout = _validate(q, kv, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, out)
    scale = check_softmax_scale(softmax_scale)
    window = check_window_size(window_size)
    cap = check_softcap(softcap)
    facts = _facts(q, layout, block_tables.shape[0], max_seqlen_q, causal, window, cap)
    result: torch.Tensor = PAGED_ATTENTION.run(
        (q,),
        q,
        kv,
        block_tables,
        seq_lens,
        cu_seqlens_q,
        facts=facts,
        backend=backend,
        max_seqlen_q=max_seqlen_q,
        softmax_scale=scale,
        causal=causal,
        window_size=window,
        softcap=cap,
        out=out,
    )
    return result


@torch.library.custom_op("llamatelemetry::flashattn_paged_attention_dispatch", mutates_args=())
def _paged_attention_op(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_scale: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_seqlen_q: int,
    softmax_scale: float | None,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float | None,
    backend: str,
) -> torch.Tensor:
    """:func:`paged_attention` as one custom op (what ``torch.compile`` records); ``window_left == -2``: no window."""
    kv = PagedKV(key_cache, value_cache, key_scale, value_scale)
    window = None if window_left == -2 else (window_left, window_right)
    result: torch.Tensor = paged_attention(
        q, kv, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q=max_seqlen_q, softmax_scale=softmax_scale,
        causal=causal, window_size=window, softcap=softcap, backend=backend or None,
    )  # fmt: skip
    return result


@_paged_attention_op.register_fake
def _(q: torch.Tensor, *args: object) -> torch.Tensor:
    return torch.empty_like(q)


def paged_decode(
    q: torch.Tensor,
    kv: PagedKV,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """One decode step: ``q`` ``[batch, num_heads, head_dim]`` (one new token per sequence, already written to
    the cache) -> ``[batch, num_heads, head_dim]``. :func:`paged_attention` with ``cu_seqlens_q = 0, 1, .., batch``
    and ``max_seqlen_q = 1``; the same errors."""
    check_tensor(q, "q")
    check_ndim(q, 3, "q", layout="[batch, num_heads, head_dim]")
    check_tensor(block_tables, "block_tables")
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0]:
        raise ConfigurationError(
            f"expected block_tables of shape [batch, max_blocks_per_seq] = [{q.shape[0]}, *] (one row per query of "
            f"q {format_shape(q.shape)}), got {format_shape(block_tables.shape)}"
        )
    cu_seqlens_q = torch.arange(q.shape[0] + 1, device=q.device, dtype=torch.int32)
    return paged_attention(
        q,
        kv,
        block_tables,
        seq_lens,
        cu_seqlens_q,
        max_seqlen_q=1,
        softmax_scale=softmax_scale,
        causal=True,
        window_size=window_size,
        softcap=softcap,
        out=out,
        backend=backend,
    )


def selected_paged_backend(
    q: torch.Tensor,
    kv: PagedKV,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    max_seqlen_q: int,
    causal: bool = True,
    window_size: tuple[int, int] | None = None,
    softcap: float | None = None,
) -> str:
    """The implementation :func:`paged_attention` would run for these inputs (nothing is computed)."""
    layout = _validate(q, kv, block_tables, seq_lens, cu_seqlens_q, max_seqlen_q, None)
    window, cap = check_window_size(window_size), check_softcap(softcap)
    facts = _facts(q, layout, block_tables.shape[0], max_seqlen_q, causal, window, cap)
    return PAGED_ATTENTION.select(CallSpec.from_tensors(q, facts=facts)).name
