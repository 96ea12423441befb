"""Writing new K/V into a paged store through a slot mapping, quantizing on the way when the store is quantized.

For every new token ``t`` whose slot ``s = slot_mapping[t]`` is not ``PAD_SLOT``: ``key_cache[s // page_size,
s % page_size] = key[t]`` (and the same for values); for int8/fp8 storage the token's heads are quantized with
:func:`~llamatelemetry_kvcache.quant.quantize_kv` and their scales written to ``key_scale``/``value_scale`` at
the same place. Layouts are core's (:mod:`llamatelemetry_core.kv_layout`): ``key``/``value`` ``[num_tokens,
num_kv_heads, head_dim]``, caches ``[num_blocks, page_size, num_kv_heads, head_dim]``, ``slot_mapping`` int64
``[num_tokens]`` (vLLM's ``reshape_and_cache`` has the same contract).

:func:`paged_write_reference` is the specification, the CPU path and the test oracle; the Triton kernel
(:mod:`llamatelemetry_kvcache.write_kernel`) registers beside it in the selection policy as ``triton``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.kernel_checks import register_triton_kernel
from llamatelemetry_core.kv_layout import PAD_SLOT, PagedKV
from llamatelemetry_core.selection import CallSpec, Operation, QuietReason
from llamatelemetry_core.validation import check_tensor, dtype_name, format_shape
from llamatelemetry_kvcache.quant import quantize_kv

__all__ = ["PAGED_WRITE", "as_bytes", "check_write_inputs", "paged_write", "paged_write_reference"]

OPERATION_NAME = "kvcache.paged_write"


def paged_write_reference(key: torch.Tensor, value: torch.Tensor, cache: PagedKV, slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[num_tokens, H_kv, D]`` into ``cache`` at ``slot_mapping``, in place."""
    layout = cache.layout
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    rows = layout.num_blocks * layout.page_size
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    if layout.quantized:
        assert cache.key_scale is not None and cache.value_scale is not None
        kq, ks = quantize_kv(key[valid], layout.dtype)
        vq, vs = quantize_kv(value[valid], layout.dtype)
        pairs = [(cache.key_cache, kq), (cache.value_cache, vq), (cache.key_scale, ks), (cache.value_scale, vs)]
    else:
        pairs = [(cache.key_cache, key[valid].to(layout.dtype)), (cache.value_cache, value[valid].to(layout.dtype))]
    for store, new in pairs:
        as_bytes(store).view(rows, *store.shape[2:]).index_copy_(0, slots, as_bytes(new))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors viewed as uint8 (PyTorch's CPU indexing kernels do not take float8); others unchanged."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.dtype != torch.int8 else t


def check_write_inputs(key: object, value: object, cache: PagedKV, slot_mapping: object) -> None:
    """Raise ``ConfigurationError``/``TypeError`` unless the inputs fit ``cache``'s layout (no host sync)."""
    layout = cache.validate()
    k = check_tensor(key, "key")
    v = check_tensor(value, "value")
    slots = check_tensor(slot_mapping, "slot_mapping")
    expected = (None, layout.num_kv_heads, layout.head_dim)
    for name, t in (("key", k), ("value", v)):
        if t.dim() != 3 or tuple(t.shape[1:]) != expected[1:]:
            raise ConfigurationError(
                f"expected {name} of shape [num_tokens, num_kv_heads={layout.num_kv_heads}, "
                f"head_dim={layout.head_dim}], got {format_shape(t.shape)}"
            )
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ConfigurationError(f"expected {name} of a float dtype (float16, bfloat16, float32), got {t.dtype}")
        if t.device != cache.key_cache.device:
            raise ConfigurationError(f"expected {name} on {cache.key_cache.device} (the cache's), got {t.device}")
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ConfigurationError(
            f"expected key and value of one shape and dtype, got {format_shape(k.shape)} {dtype_name(k.dtype)} and "
            f"{format_shape(v.shape)} {dtype_name(v.dtype)}"
        )
    if not layout.quantized and k.dtype != layout.dtype:
        raise ConfigurationError(
            f"expected key/value of the cache's dtype {dtype_name(layout.dtype)}, got {dtype_name(k.dtype)}"
        )
    if slots.dtype != torch.int64 or tuple(slots.shape) != (k.shape[0],) or slots.device != k.device:
        raise ConfigurationError(
            f"expected slot_mapping as int64 [{k.shape[0]}] on {k.device} (one slot per token, -1 = padding), got "
            f"{dtype_name(slots.dtype)} {format_shape(slots.shape)} on {slots.device}"
        )
    if slots.device.type == "cpu" and slots.numel():  # on a GPU the check would synchronise; here it is free
        rows = layout.num_blocks * layout.page_size
        lo, hi = int(slots.min()), int(slots.max())
        if lo < PAD_SLOT or hi >= rows:
            raise ConfigurationError(
                f"expected slot_mapping in [0, {rows}) (num_blocks * page_size) or {PAD_SLOT} (padding), got "
                f"values in [{lo}, {hi}]"
            )


@dataclass(frozen=True)
class PagedWriteCall:
    """The facts of one paged KV write that implementations check (``CallSpec.facts``): the cache's dtype."""

    kv_dtype: torch.dtype


def _fp8_on_device(call: CallSpec) -> str | None:
    fp8 = getattr(torch, "float8_e4m3fn", None)
    facts = call.facts_as(PagedWriteCall)
    if facts is not None and facts.kv_dtype == fp8 and not call.device.is_cuda:
        return QuietReason("the interpreter has no float8 e4m3 conversion; CPU fp8 storage takes the reference")
    return None


def _interpreter_dtypes(call: CallSpec) -> str | None:
    # The interpreter (CPU) computes with NumPy, which has no bfloat16. Only the interpreter (a test setting) meets
    # these limits, so the reference takes over without a warning.
    if not call.device.is_cuda and call.dtype not in (torch.float16, torch.float32):
        return QuietReason(f"the interpreter writes float16 and float32 K/V, not {call.dtype}")
    return None


def _triton_impl(key: torch.Tensor, value: torch.Tensor, cache: PagedKV, slot_mapping: torch.Tensor) -> None:
    from llamatelemetry_kvcache.write_kernel import triton_paged_write

    triton_paged_write(key, value, cache, slot_mapping)


PAGED_WRITE = Operation(OPERATION_NAME, paged_write_reference, aliases=("paged_kv_write",))
register_triton_kernel(PAGED_WRITE, _triton_impl, _interpreter_dtypes, _fp8_on_device, priority=300)


def paged_write(
    key: torch.Tensor,
    value: torch.Tensor,
    cache: PagedKV,
    slot_mapping: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Write new K/V into ``cache`` through ``slot_mapping`` (see the module docstring), in place.

    ``backend`` forces ``"triton"`` or ``"reference"``. Slots must lie in ``[0, num_blocks * page_size)`` or be
    ``PAD_SLOT``; on a GPU they are not range-checked on the host (that would synchronise with the GPU), on a CPU
    a slot out of range raises ``ConfigurationError``.
    """
    if torch.compiler.is_compiling() and isinstance(cache, PagedKV):
        # Dynamo cannot trace the slot range check (it reads values) nor the selection machinery: the whole call
        # is one custom op of the graph, whose body is this function run eagerly (checks, then the implementation
        # selected at run time, so LLAMATELEMETRY_BACKEND and backend= are honoured as they are eagerly).
        _paged_write_op(
            key, value, cache.key_cache, cache.value_cache, cache.key_scale, cache.value_scale, slot_mapping,
            backend or "",
        )  # fmt: skip
        return
    check_write_inputs(key, value, cache, slot_mapping)
    facts = PagedWriteCall(cache.key_cache.dtype)
    PAGED_WRITE.run((key, slot_mapping), key, value, cache, slot_mapping, facts=facts, backend=backend)


@torch.library.custom_op(
    "llamatelemetry::kvcache_paged_write_dispatch",
    mutates_args=("key_cache", "value_cache", "key_scale", "value_scale"),
)
def _paged_write_op(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_scale: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    slot_mapping: torch.Tensor,
    backend: str,
) -> None:
    """:func:`paged_write` as one custom op (what ``torch.compile`` records): it writes the caches in place."""
    paged_write(key, value, PagedKV(key_cache, value_cache, key_scale, value_scale), slot_mapping,
                backend=backend or None)  # fmt: skip
