"""``flash_attention_forward`` and ``check_flash_attention_available``: the documented entry points."""

from __future__ import annotations

import math

import torch

from llamatelemetry_core.device import get_device_info
from llamatelemetry_core.environment import flash_attn_status
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.selection import CallSpec
from llamatelemetry_core.traced import FactsSpec, dispatch
from llamatelemetry_core.validation import (
    check_dtype,
    check_ndim,
    check_probability,
    check_same_device,
    check_tensor,
    format_shape,
)
from llamatelemetry_flashattn.backends import ATTENTION, AttentionCall
from llamatelemetry_flashattn.config import (
    FlashAttentionConfig,
    check_softcap,
    check_softmax_scale,
    check_window_size,
)

__all__ = ["check_flash_attention_available", "flash_attention_forward", "selected_backend"]

_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAYOUT = "[batch, seqlen, num_heads, head_dim]"
_DEFAULTS = FlashAttentionConfig()


def check_flash_attention_available() -> bool:
    """True only when the flash-attn package imports and can run on the current GPU (SM >= 8.0).

    ``False`` on a CPU-only machine, on a T4 (SM 7.5) and wherever flash-attn is not installed: attention then
    still runs, through PyTorch's SDPA or the Triton kernel; see :func:`attention_backend_report` for which.
    """
    return flash_attn_status(get_device_info()).usable


def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name)
        check_ndim(t, 4, name, layout=_LAYOUT)
    device = check_same_device({"q": q, "k": k, "v": v})
    allowed = _CPU_DTYPES if device.type == "cpu" else _GPU_DTYPES
    check_dtype(q, allowed, "q", hint="GPUs run fp16 or bf16 (fp32 on slower paths): convert with q.half()")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ConfigurationError(
            f"expected q, k and v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; convert k and v with .to(q.dtype)"
        )
    batch, _, heads, head_dim = q.shape
    _, _, kv_heads, k_dim = k.shape
    if k.shape[0] != batch or k_dim != head_dim or kv_heads == 0 or heads % kv_heads:
        raise ConfigurationError(
            f"expected k of shape [B, S, H_kv, D] = [{batch}, *, H_kv, {head_dim}] with H % H_kv == 0, "
            f"got {format_shape(k.shape)} for q heads {heads}"
        )
    if tuple(v.shape) != tuple(k.shape):
        raise ConfigurationError(
            f"expected v of the same shape as k, {format_shape(k.shape)}, got {format_shape(v.shape)}"
        )
    if head_dim == 0:
        raise ConfigurationError(f"expected head_dim > 0, got q of shape {format_shape(q.shape)}")


def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool | None = None,
    dropout_p: float | None = None,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] | None = None,
    *,
    softcap: float | None = None,
    training: bool = True,
    backend: str | None = None,
    config: FlashAttentionConfig | None = None,
) -> torch.Tensor:
    """Exact attention in O(n) memory on the fastest implementation that supports the call here.

    ``q`` is ``[batch, q_len, num_heads, head_dim]``; ``k`` and ``v`` are ``[batch, kv_len, num_kv_heads,
    head_dim]`` with ``num_heads % num_kv_heads == 0`` (grouped- and multi-query attention). Returns
    ``[batch, q_len, num_heads, head_dim]`` in q's dtype: fp16/bf16 on GPUs (fp32 runs too, on the SDPA
    memory-efficient or reference paths), fp16/bf16/fp32/fp64 on CPU.

    * ``causal`` (default True): query ``i`` sees keys up to ``kv_len - q_len + i`` (aligned to the end: decode
      and chunked prefill work as they should). A query that sees no key returns zeros, ``kv_len == 0``
      included.
    * ``window_size=(left, right)``: query at position ``p`` sees keys ``p - left .. p + right``; ``-1`` is
      unbounded (FlashAttention's convention).
    * ``softcap``: logits become ``softcap * tanh(logits / softcap)`` (Gemma 2).
    * ``dropout_p`` (default 0): applied only when ``training`` is true (pass ``training=module.training``); it
      is validated either way.
    * ``backend``: run this implementation or raise ``BackendUnavailableError`` (also ``LLAMATELEMETRY_BACKEND``).
    * ``config``: a :class:`FlashAttentionConfig` supplying the settings not passed explicitly. An argument
      given explicitly (anything but ``None``) always wins over the config's field; to override a config's
      window with full attention, pass ``window_size=(-1, -1)``.

    NaN propagates the same way on every implementation: a query row holding NaN or an infinity gives a NaN
    output row, and a NaN key or value poisons the rows that see it.

    Which implementation ran is recorded: ``llamatelemetry_core.selection.last_selection("flashattn.attention")``.
    Raises ``ConfigurationError`` (a ``ValueError``) for invalid shapes, dtypes or settings.
    """
    if config is not None and not isinstance(config, FlashAttentionConfig):
        raise TypeError(f"expected config to be a FlashAttentionConfig or None, got {type(config).__name__}")
    base = config if config is not None else _DEFAULTS
    causal = base.causal if causal is None else causal
    dropout_p = base.dropout_p if dropout_p is None else dropout_p
    softmax_scale = base.softmax_scale if softmax_scale is None else softmax_scale
    window_size = base.window_size if window_size is None else window_size
    softcap = base.softcap if softcap is None else softcap
    backend = base.backend if backend is None else backend
    _validate(q, k, v)
    if not isinstance(causal, bool):
        raise ConfigurationError(f"expected causal to be True or False, got {causal!r}")
    if not isinstance(training, bool):
        raise ConfigurationError(f"expected training to be True or False, got {training!r}")
    dropout = check_probability(dropout_p, "dropout_p")
    dropout = dropout if training else 0.0
    scale = check_softmax_scale(softmax_scale)
    window = check_window_size(window_size)
    cap = check_softcap(softcap)
    head_dim = int(q.shape[3])
    facts: FactsSpec = (
        AttentionCall,
        (
            ("batch", int(q.shape[0])),
            ("q_len", int(q.shape[1])),
            ("kv_len", int(k.shape[1])),
            ("num_heads", int(q.shape[2])),
            ("num_kv_heads", int(k.shape[2])),
            ("head_dim", head_dim),
            ("causal", causal),
            ("window_size", window),
            ("softcap", cap),
            ("dropout_p", dropout),
            ("needs_grad", torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)),
        ),
    )
    out: torch.Tensor = dispatch(
        ATTENTION,
        (q, k, v),
        q,
        k,
        v,
        facts=facts,
        backend=backend,
        causal=causal,
        softmax_scale=scale if scale is not None else 1.0 / math.sqrt(head_dim),
        window_size=window,
        softcap=cap,
        dropout_p=dropout,
    )
    return out


def selected_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    window_size: tuple[int, int] | None = None,
    *,
    softcap: float | None = None,
    dropout_p: float = 0.0,
) -> str:
    """The implementation :func:`flash_attention_forward` would run for these inputs (nothing is computed)."""
    _validate(q, k, v)
    facts = AttentionCall(
        batch=q.shape[0],
        q_len=q.shape[1],
        kv_len=k.shape[1],
        num_heads=q.shape[2],
        num_kv_heads=k.shape[2],
        head_dim=q.shape[3],
        causal=causal,
        window_size=check_window_size(window_size),
        softcap=check_softcap(softcap),
        dropout_p=dropout_p,
        needs_grad=False,
    )
    return ATTENTION.select(CallSpec.from_tensors(q, k, v, facts=facts)).name
