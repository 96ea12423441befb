"""llamatelemetry-flashattn: exact attention in O(n) memory on the fastest path each GPU has.

Documented import path: ``llamatelemetry.inference.flash_attn``.

* :func:`flash_attention_forward`: ``[batch, seqlen, heads, head_dim]`` attention (causal aligned to the end,
  grouped-query, sliding window, softcap, dropout in training) dispatched to flash-attn, PyTorch SDPA (cuDNN,
  flash, memory-efficient), our Triton FlashAttention-2 kernel or the PyTorch reference, whichever is fastest
  here and supports the call; :func:`attention_backend_report` says which runs here and why the others do not.
* :func:`enable_flash_attention`: route a transformers decoder's or ``nn.MultiheadAttention``'s attention
  through it.
* :func:`check_flash_attention_available`: is the flash-attn package usable on this GPU.
* :func:`get_optimal_context_length`: the longest context that fits a GPU, by a documented formula.
* :func:`paged_attention` / :func:`paged_decode`: attention over a paged KV cache in the layout of
  :mod:`llamatelemetry_core.kv_layout` (decode and chunked prefill, GQA, window, softcap, int8/fp8 storage), on
  a Triton kernel or the gather-then-attend reference; :func:`paged_backend_report` says which runs here.
"""

from llamatelemetry_flashattn.__about__ import __version__
from llamatelemetry_flashattn.attention import (
    check_flash_attention_available,
    flash_attention_forward,
    selected_backend,
)
from llamatelemetry_flashattn.backends import ATTENTION, OPERATION_NAME, BackendReport, attention_backend_report
from llamatelemetry_flashattn.config import FlashAttentionConfig
from llamatelemetry_flashattn.context import MemoryEstimate, estimate_inference_memory, get_optimal_context_length
from llamatelemetry_flashattn.paged import paged_attention, paged_decode, selected_paged_backend
from llamatelemetry_flashattn.paged_backends import (
    PAGED_ATTENTION,
    PAGED_OPERATION_NAME,
    PagedBackendReport,
    paged_backend_report,
)
from llamatelemetry_flashattn.paged_reference import paged_attention_reference
from llamatelemetry_flashattn.patching import (
    HF_ATTENTION_NAME,
    disable_flash_attention,
    enable_flash_attention,
    register_when_transformers_loads,
)
from llamatelemetry_flashattn.reference import attention_reference

register_when_transformers_loads()  # attn_implementation="llamatelemetry" works with no other call

__all__ = [
    "ATTENTION",
    "HF_ATTENTION_NAME",
    "OPERATION_NAME",
    "PAGED_ATTENTION",
    "PAGED_OPERATION_NAME",
    "BackendReport",
    "FlashAttentionConfig",
    "MemoryEstimate",
    "PagedBackendReport",
    "__version__",
    "attention_backend_report",
    "attention_reference",
    "check_flash_attention_available",
    "disable_flash_attention",
    "enable_flash_attention",
    "estimate_inference_memory",
    "flash_attention_forward",
    "get_optimal_context_length",
    "paged_attention",
    "paged_attention_reference",
    "paged_backend_report",
    "paged_decode",
    "selected_backend",
    "selected_paged_backend",
]
