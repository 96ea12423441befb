"""The paged K/V write as a Triton kernel (what :func:`~llamatelemetry_kvcache.paged_write.paged_write` computes).

One program per (token, group of KV heads): it loads the token's ``[heads, head_dim]`` tile of K and of V, and
stores it at the token's slot; a padded token (slot ``-1``) stores nothing. Quantized storage computes each head's
scale (``max|x| / qmax``) from the tile in registers, rounds ``x / scale`` (half to even, as ``torch.round``) and
stores values and scales, so a quantized write reads the fp16 K/V once and writes a byte per element: the same
arithmetic, in fp32, as :func:`~llamatelemetry_kvcache.quant.quantize_kv`, hence bit-identical results. The tile
is at most 4096 elements, whatever the head count, so that a T4's register file holds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from llamatelemetry_core.device import DeviceInfo
from llamatelemetry_core.interpreter import triton_launch_guard
from llamatelemetry_core.kv_layout import PagedKV
from llamatelemetry_kvcache.quant import qmax_of

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild

__all__ = ["AOT_HEAD_DIMS", "kernel_build", "kernel_builds", "triton_paged_write", "write_tiles"]

AOT_HEAD_DIMS = (64, 128, 256)
_AOT_KV_HEADS = 8
_MAX_TILE = 4096
_FP8 = getattr(torch, "float8_e4m3fn", None)
_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "i8"}
if _FP8 is not None:
    _TRITON_DTYPES[_FP8] = "fp8e4nv"


@triton.jit  # type: ignore[untyped-decorator]
def _quantize_store(x, Cache, Scale, dst, scale_dst, mask, head_mask, QUANT: tl.constexpr, QMAX: tl.constexpr):  # type: ignore[no-untyped-def]
    xf = x.to(tl.float32)
    # A NaN counts as an infinity (a GPU maximum would drop it), as in the reference; a head that is not finite
    # gets a NaN scale below, so that all of it reads back as NaN, whatever the cast of its values stored.
    amax = tl.max(tl.where(xf == xf, tl.abs(xf), float("inf")), axis=1)
    # IEEE divisions (div_rn): Triton's ``/`` on fp32 is an approximate division on GPUs, which moved int8
    # values by one step against the PyTorch reference on an H200. Only an all-zero head takes the scale 1.
    scale = tl.where(amax == 0, 1.0, tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32)))
    scale = tl.where(amax < float("inf"), scale, float("nan"))
    y = tl.math.div_rn(xf, tl.broadcast_to(scale[:, None], xf.shape))
    if QUANT == 1:
        r = tl.floor(y + 0.5)
        # Half to even, as torch.round: a tie rounded up to an odd integer goes back down by one.
        tie = (r - y) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        r = tl.where(tie & odd, r - 1.0, r)
        r = tl.minimum(tl.maximum(r, -QMAX), QMAX)
        tl.store(Cache + dst, r.to(tl.int8), mask=mask)
    else:
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        tl.store(Cache + dst, y.to(Cache.dtype.element_ty), mask=mask)
    tl.store(Scale + scale_dst, scale, mask=head_mask)


@triton.jit  # type: ignore[untyped-decorator]
def _paged_write_kernel(  # type: ignore[no-untyped-def]
    Key,
    Value,
    KeyCache,
    ValueCache,
    KeyScale,
    ValueScale,
    SlotMapping,
    num_kv_heads,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    QUANT: tl.constexpr,
    QMAX: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    slot = tl.load(SlotMapping + token)
    # A padding token (slot < 0) writes no head. The scalar test goes into the bound, not into a block & scalar
    # "and", which Triton 3.9's interpreter turns into an integer mask it then rejects.
    head_mask = heads < tl.where(slot >= 0, num_kv_heads, 0)
    mask = head_mask[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(Key + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask, other=0.0)
    v = tl.load(Value + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask, other=0.0)
    # The store is contiguous: [num_blocks * page_size, num_kv_heads, head_dim], so a slot is a row.
    row = slot * num_kv_heads
    dst = (row + heads[:, None]) * HEAD_DIM + dims[None, :]
    if QUANT == 0:
        tl.store(KeyCache + dst, k.to(KeyCache.dtype.element_ty), mask=mask)
        tl.store(ValueCache + dst, v.to(ValueCache.dtype.element_ty), mask=mask)
    else:
        _quantize_store(k, KeyCache, KeyScale, dst, row + heads, mask, head_mask, QUANT, QMAX)
        _quantize_store(v, ValueCache, ValueScale, dst, row + heads, mask, head_mask, QUANT, QMAX)


def write_tiles(num_kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """``(BLOCK_H, BLOCK_D, num_warps)``: the head dimension whole, as many heads as fit a 4096-element tile."""
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(1, min(triton.next_power_of_2(num_kv_heads), _MAX_TILE // block_d))
    num_warps = 4 if block_h * block_d >= 1024 else (2 if block_h * block_d >= 256 else 1)
    return block_h, block_d, num_warps


def _quant_code(kv_dtype: torch.dtype) -> int:
    if kv_dtype == torch.int8:
        return 1
    return 2 if _FP8 is not None and kv_dtype == _FP8 else 0


def triton_paged_write(key: torch.Tensor, value: torch.Tensor, cache: PagedKV, slot_mapping: torch.Tensor) -> None:
    """Launch the write kernel; inputs as checked by :func:`~llamatelemetry_kvcache.paged_write.check_write_inputs`.

    While ``torch.compile`` traces, the launch goes through the custom op ``llamatelemetry::kvcache_paged_write``
    (which declares what it mutates); eagerly it launches directly, sparing the dispatcher's overhead.
    """
    # The kernel reads one slot per token at unit stride (a no-op for a contiguous mapping).
    slots = slot_mapping.contiguous()
    args = (key, value, cache.key_cache, cache.value_cache, cache.key_scale, cache.value_scale, slots)
    if torch.compiler.is_compiling():
        torch.ops.llamatelemetry.kvcache_paged_write(*args)
    else:
        _launch(*args)


def _launch(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_scale: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    slot_mapping: torch.Tensor,
) -> None:
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    _, _, num_kv_heads, head_dim = key_cache.shape
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    quant = _quant_code(key_cache.dtype)
    block_h, block_d, num_warps = write_tiles(num_kv_heads, head_dim)
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    with torch.cuda.device(key.device) if key.is_cuda else triton_launch_guard(key.device):
        _paged_write_kernel[grid](
            key,
            value,
            key_cache,
            value_cache,
            key_scale if key_scale is not None else key_cache,
            value_scale if value_scale is not None else value_cache,
            slot_mapping,
            num_kv_heads,
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_H=block_h,
            QUANT=quant,
            QMAX=qmax_of(key_cache.dtype) if quant else 1.0,
            num_warps=num_warps,
            enable_fp_fusion=True,  # the default up to Triton 3.9; 3.10 turns it off
        )


_paged_write_op = torch.library.custom_op(
    "llamatelemetry::kvcache_paged_write", mutates_args=("key_cache", "value_cache", "key_scale", "value_scale")
)(_launch)


@_paged_write_op.register_fake
def _(*args: object) -> None:
    return None


def kernel_build(
    head_dim: int, num_kv_heads: int, dtype: torch.dtype, kv_dtype: torch.dtype, device: DeviceInfo
) -> KernelBuild:
    """The build :func:`triton_paged_write` launches for these sizes and dtypes (``device`` for the record)."""
    from llamatelemetry_core.aot import KernelBuild

    del device  # the tile does not depend on the GPU: 4096 elements at most fit every register file
    block_h, block_d, num_warps = write_tiles(num_kv_heads, head_dim)
    quant = _quant_code(kv_dtype)
    src, dst = "*" + _TRITON_DTYPES[dtype], "*" + _TRITON_DTYPES[kv_dtype]
    signature: dict[str, str] = {"Key": src, "Value": src, "KeyCache": dst, "ValueCache": dst}
    signature.update({"KeyScale": "*fp32" if quant else dst, "ValueScale": "*fp32" if quant else dst})
    signature.update({"SlotMapping": "*i64", "num_kv_heads": "i32"})
    signature.update(dict.fromkeys(("stride_kt", "stride_kh", "stride_vt", "stride_vh"), "i32"))
    constexprs: dict[str, int | float | bool | str] = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "BLOCK_H": block_h,
        "QUANT": quant,
        "QMAX": qmax_of(kv_dtype) if quant else 1.0,
    }
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    name = f"kvcache.paged_write[{_TRITON_DTYPES[dtype]}->{_TRITON_DTYPES[kv_dtype]},d={head_dim},h={block_h}]"
    return KernelBuild(name, _paged_write_kernel, signature, constexprs, num_warps=num_warps, num_stages=1)


def kernel_builds(device: DeviceInfo) -> Iterator[KernelBuild]:
    """Every write the library launches on ``device`` for 8 KV heads and head dims 64, 128, 256: unquantized
    fp16 (and bf16 where the device has it), int8 from fp16, and fp8 from fp16 where the device has fp8."""
    dtypes = [torch.float16, torch.bfloat16] if device.supports_bf16 else [torch.float16]
    for head_dim in AOT_HEAD_DIMS:
        for dtype in dtypes:
            yield kernel_build(head_dim, _AOT_KV_HEADS, dtype, dtype, device)
        yield kernel_build(head_dim, _AOT_KV_HEADS, torch.float16, torch.int8, device)
        if device.supports_fp8 and _FP8 is not None:
            yield kernel_build(head_dim, _AOT_KV_HEADS, torch.float16, _FP8, device)
