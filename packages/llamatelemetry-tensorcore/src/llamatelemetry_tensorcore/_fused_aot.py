"""Ahead-of-time builds of the fused ``matmul_tensor_core`` kernels (what ``fused_matmul.kernel_builds`` yields):
each launch configuration the launcher picks on a device for decode, prefill and square shapes, compiled without
a GPU by ``python -m llamatelemetry_core.aot``."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from llamatelemetry_core.aot import KernelBuild, kernel_signature
from llamatelemetry_core.device import DeviceInfo
from llamatelemetry_tensorcore._fused_kernels import largest_finite_kernel, scaled_matmul_kernel, split_sum_kernel
from llamatelemetry_tensorcore.fused_matmul import FusedTiles, fused_tiles, split_k

__all__ = ["aot_builds"]

_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# (M, N): decode, a few rows, a prefill chunk, squares; between them every tile shape fused_tiles picks
_AOT_SHAPES = ((1, 4096), (48, 4096), (128, 4096), (1024, 1024), (4096, 4096))
_AOT_K = 4096  # the inner dimension that decides which of those shapes split K
# The launches' unit strides (row-major A, B and C), which Triton's JIT specializes as constants as well
_UNIT_STRIDES = ("stride_ak", "stride_bn", "stride_cn")
_Constexprs = dict[str, int | float | bool | str]


def _gemm_build(in_dtype: torch.dtype, tiles: FusedTiles, *, single: bool = False, split: bool = False) -> KernelBuild:
    ptr = "*" + _TRITON_TYPES[in_dtype]
    types = {"a_ptr": ptr, "b_ptr": ptr, "c_ptr": ptr, "partial_ptr": "*i32", "workspace_ptr": "*fp32"}
    types.update(dict.fromkeys(("half", "quarter", "eighth"), "i64"))
    signature = kernel_signature(scaled_matmul_kernel, types)
    signature.update(dict.fromkeys(_UNIT_STRIDES, "constexpr"))  # in place: the order stays the kernel's
    constexprs: _Constexprs = {
        "BLOCK_M": tiles.block_m,
        "BLOCK_N": tiles.block_n,
        "BLOCK_K": tiles.block_k,
        "GROUP_M": tiles.group_m,
        "REDUCE_BLOCK": tiles.one_launch_block if single else tiles.partials,
        "ONE_LAUNCH": single,
        "SPLIT_K": split,
        "PIPELINED": True,
        **dict.fromkeys(_UNIT_STRIDES, 1),
    }
    form = ",one-launch" if single else ",split-k" if split else ""
    name = (
        f"tensorcore.fused_matmul[{_TRITON_TYPES[in_dtype]}->fp16,{tiles.block_m}x{tiles.block_n}x{tiles.block_k},"
        f"w{tiles.num_warps},s{tiles.num_stages}{form}]"
    )
    return KernelBuild(
        name, scaled_matmul_kernel, signature, constexprs, num_warps=tiles.num_warps, num_stages=tiles.num_stages
    )


def _split_sum_build(out_dtype: torch.dtype, tiles: FusedTiles) -> KernelBuild:
    types = {"workspace_ptr": "*fp32", "c_ptr": "*" + _TRITON_TYPES[out_dtype], "partial_ptr": "*i32"}
    types.update(dict.fromkeys(("half", "quarter", "eighth"), "i64"))
    signature = kernel_signature(split_sum_kernel, types)
    signature["stride_cn"] = "constexpr"
    constexprs: _Constexprs = {
        "BLOCK": tiles.split_sum_block,
        "PARTIALS": tiles.partials,
        "PIPELINED": True,
        "stride_cn": 1,
    }
    name = f"tensorcore.split_sum[->{_TRITON_TYPES[out_dtype]},{tiles.split_sum_block},w{tiles.split_sum_warps}]"
    return KernelBuild(name, split_sum_kernel, signature, constexprs, num_warps=tiles.split_sum_warps)


def _reduction_build(in_dtype: torch.dtype, tiles: FusedTiles) -> KernelBuild:
    ptr = "*" + _TRITON_TYPES[in_dtype]
    signature = kernel_signature(largest_finite_kernel, {"a_ptr": ptr, "b_ptr": ptr, "partial_ptr": "*i32"})
    constexprs: _Constexprs = {"BLOCK": tiles.reduce_block, "PIPELINED": True}
    name = f"tensorcore.largest_finite[{_TRITON_TYPES[in_dtype]},{tiles.reduce_block},w{tiles.reduce_warps}]"
    return KernelBuild(name, largest_finite_kernel, signature, constexprs, num_warps=tiles.reduce_warps)


def aot_builds(device: DeviceInfo) -> Iterator[KernelBuild]:
    """The builds on ``device``: the GEMM with the tiles :func:`fused_tiles` picks for decode, prefill and square
    shapes, from fp32 (and bf16 where the device has it), its one-launch form for a small product, its split-K
    form for the shapes :func:`split_k` splits (K = 4096) with the sum of the splits, and the reduction."""
    in_dtypes = [torch.float32, torch.bfloat16] if device.supports_bf16 else [torch.float32]
    chosen = {(m, n): fused_tiles(m, n, 1, device) for m, n in _AOT_SHAPES}
    configs = list(dict.fromkeys(chosen.values()))
    splitting = [t for (m, n), t in chosen.items() if split_k(m, n, _AOT_K, 1, t, device).splits > 1]
    small = fused_tiles(128, 128, 1, device)  # what one launch takes: A and B of 2^15 elements together
    for in_dtype in in_dtypes:
        for tiles in configs:
            yield _gemm_build(in_dtype, tiles)
        for tiles in dict.fromkeys(splitting):
            yield _gemm_build(in_dtype, tiles, split=True)
        yield _gemm_build(in_dtype, small, single=True)
        if splitting:
            yield _split_sum_build(in_dtype, splitting[0])
        yield _reduction_build(in_dtype, configs[0])
