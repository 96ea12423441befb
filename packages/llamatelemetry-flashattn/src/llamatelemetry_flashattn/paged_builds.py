"""Ahead-of-time builds of the paged attention kernels (``llamatelemetry.kernel_builds`` entry ``flashattn_paged``).

``python -m llamatelemetry_core.aot --device t4 --device a100 --device h100`` compiles each build with the tiles
:func:`~llamatelemetry_flashattn.paged_tiles.choose_paged_tiles` picks on that device and checks it against the
device's limits (a T4 allows 64 KiB of shared memory per block). The builds are what the library launches with
page size 16: decode (one query, four query heads per KV head) with and without split-KV, and a chunk of prefill.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from llamatelemetry_core.device import DeviceInfo
from llamatelemetry_flashattn.paged_tiles import MERGE_BLOCK_S, PagedTiles, choose_paged_tiles, uses_page_ids
from llamatelemetry_flashattn.tiles import padded_head_dim

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild

__all__ = ["AOT_HEAD_DIMS", "AOT_PAGE_SIZE", "kernel_build", "kernel_builds", "kv_dtypes_for", "merge_kernel_build"]


_TRITON_DTYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.int8: "i8",
}
if hasattr(torch, "float8_e4m3fn"):
    _TRITON_DTYPES[torch.float8_e4m3fn] = "fp8e4nv"


def _build_name(q_dtype: torch.dtype, kv_dtype: torch.dtype, head_dim: int, kind: str, tiles: PagedTiles) -> str:
    kv = _TRITON_DTYPES[kv_dtype]
    ids = ",page-ids" if tiles.page_ids else ""
    return (
        f"flashattn.paged[{_TRITON_DTYPES[q_dtype]},kv={kv},d={head_dim},p={AOT_PAGE_SIZE},{kind},"
        f"{tiles.block_m}x{tiles.block_n},w{tiles.num_warps},s{tiles.num_stages}{ids}]"
    )


AOT_PAGE_SIZE = 16
AOT_HEAD_DIMS = (64, 128, 256)
_DECODE_ROWS = 4  # one query, four query heads per KV head (Llama-3-8B's grouping)


def kernel_build(
    head_dim: int, q_dtype: torch.dtype, kv_dtype: torch.dtype, device: DeviceInfo, *, kind: str
) -> KernelBuild:
    """The attention kernel's build for ``kind`` in ``("decode", "decode-split", "prefill")`` on ``device``."""
    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_flashattn.paged_kernel import _paged_attention_kernel

    rows = None if kind == "prefill" else _DECODE_ROWS
    tiles = choose_paged_tiles(head_dim, q_dtype, kv_dtype, device, rows_per_program=rows)
    split = kind == "decode-split"
    q_ptr, kv_ptr = "*" + _TRITON_DTYPES[q_dtype], "*" + _TRITON_DTYPES[kv_dtype]
    quantized = kv_dtype not in (torch.float16, torch.bfloat16, torch.float32)
    scale_ptr = "*fp32" if quantized else kv_ptr
    partial_ptr = "*fp32" if split else q_ptr
    signature: dict[str, str] = {
        "Q": q_ptr,
        "KCache": kv_ptr,
        "VCache": kv_ptr,
        "KScale": scale_ptr,
        "VScale": scale_ptr,
        "BlockTables": "*i32",
        "SeqLens": "*i32",
        "CuSeqlensQ": "*i32",
        "Out": q_ptr,
        "PartialOut": partial_ptr,
        "PartialLse": partial_ptr,
    }
    for name in (
        "stride_qt",
        "stride_qh",
        "stride_kv_block",
        "stride_kv_token",
        "stride_kv_head",
        "stride_scale_block",
        "stride_scale_token",
        "stride_bt",
        "stride_ot",
        "stride_oh",
        "stride_ps",
        "stride_pt",
        "stride_ph",
        "stride_ls",
        "stride_lt",
        "num_kv_heads",
        "group",
        "num_splits",
    ):
        signature[name] = "i32"
    signature.update({"qk_scale": "fp32", "softcap_log2": "fp32", "window_left": "i32", "window_right": "i32"})
    constexprs: dict[str, int | float | bool | str] = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": tiles.block_d,
        "BLOCK_M": tiles.block_m,
        "BLOCK_N": tiles.block_n,
        "PAGE_SIZE": AOT_PAGE_SIZE,
        "PAGE_IDS": uses_page_ids(tiles, AOT_PAGE_SIZE),
        "SPLIT_KV": split,
        "QUANTIZED": quantized,
        "USE_SOFTCAP": False,
        "PIPELINED": True,
    }
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    name = _build_name(q_dtype, kv_dtype, head_dim, kind, tiles)
    return KernelBuild(
        name,
        _paged_attention_kernel,
        signature,
        constexprs,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )


def merge_kernel_build(head_dim: int, q_dtype: torch.dtype) -> KernelBuild:
    """The split-KV merge kernel's build for ``head_dim`` (the same on every device)."""
    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_flashattn import paged_kernel

    block_d = padded_head_dim(head_dim)
    signature: dict[str, str] = {"PartialOut": "*fp32", "PartialLse": "*fp32", "Out": "*" + _TRITON_DTYPES[q_dtype]}
    for name in ("stride_ps", "stride_pt", "stride_ph", "stride_ls", "stride_lt", "stride_ot", "stride_oh"):
        signature[name] = "i32"
    signature["num_splits"] = "i32"
    constexprs: dict[str, int | float | bool | str] = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "BLOCK_S": MERGE_BLOCK_S,
    }
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    name = f"flashattn.paged_merge[{_TRITON_DTYPES[q_dtype]},d={head_dim}]"
    return KernelBuild(
        name,
        paged_kernel._merge_splits_kernel,
        signature,
        constexprs,
        num_warps=paged_kernel.merge_warps(block_d),
        num_stages=1,
    )


def kv_dtypes_for(q_dtype: torch.dtype, device: DeviceInfo) -> list[torch.dtype]:
    """KV storage dtypes the kernel runs with ``q_dtype`` on ``device``: q's own, int8, and fp8 where it exists."""
    dtypes = [q_dtype, torch.int8]
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is not None and device.supports_fp8:
        dtypes.append(fp8)
    return dtypes


def kernel_builds(device: DeviceInfo) -> Iterator[KernelBuild]:
    """The builds whose resources bound what the library launches on ``device`` (page size 16).

    For fp16 queries, and bf16 where the device supports it: head dim 128 (decode, decode with split-KV,
    prefill), 256 (decode, prefill: the largest tiles) and 64 (prefill), KV stored in q's dtype; with fp16
    queries, int8 storage and, where the device has fp8, e4m3 storage at head dim 128 (decode, prefill); the
    merge kernel at head dims 64, 128 and 256. Each compile for sm_75 takes tens of seconds, so the list covers
    the extremes rather than every combination.
    """
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    q_dtypes = [torch.float16, torch.bfloat16] if device.supports_bf16 else [torch.float16]
    plain = [
        (128, "decode"),
        (128, "decode-split"),
        (128, "prefill"),
        (256, "decode"),
        (256, "prefill"),
        (64, "prefill"),
    ]
    for q_dtype in q_dtypes:
        for head_dim, kind in plain:
            yield kernel_build(head_dim, q_dtype, q_dtype, device, kind=kind)
    for kv_dtype in kv_dtypes_for(torch.float16, device)[1:]:
        for kind in ("decode", "prefill"):
            yield kernel_build(128, torch.float16, kv_dtype, device, kind=kind)
    for head_dim in AOT_HEAD_DIMS:
        yield merge_kernel_build(head_dim, torch.float16)
