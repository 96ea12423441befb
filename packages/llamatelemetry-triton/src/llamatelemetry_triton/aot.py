"""The ahead-of-time build provider: every built-in kernel as this library would launch it on a device.

Registered under the ``llamatelemetry.kernel_builds`` entry point, so that ``python -m llamatelemetry_core.aot
--device t4 --device a100 --device h100`` compiles each kernel for that GPU's compute capability (no GPU needed)
and checks shared memory, threads and registers against its limits. The launch configurations come from the
same choosers the launchers call (:mod:`llamatelemetry_triton.heuristics`), for representative shapes: hidden
sizes 768, 4096, 8192 and 16384, a 128256-long softmax row, head dimensions 64 and 128; fp16 and fp32
everywhere, bf16 only on GPUs that support it. Builds whose kernel, types and configuration coincide are
yielded once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from llamatelemetry_triton.heuristics import (
    elementwise_config,
    glu_config,
    next_power_of_2,
    norm_config,
    rope_config,
    softmax_config,
)
from llamatelemetry_triton.ops import add, glu, norm, rope, softmax

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = ["HEAD_DIMS", "HIDDEN_SIZES", "VOCAB_SIZE", "kernel_builds"]

HIDDEN_SIZES = (768, 4096, 8192, 16384)
VOCAB_SIZE = 128256
HEAD_DIMS = (64, 128)
_ROWS = 4096
_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# (is_rms, has_residual, has_weight, has_bias) of LayerNorm, RMSNorm and their fused residual forms
_NORM_VARIANTS = {
    "layernorm": (False, False, True, True),
    "rmsnorm": (True, False, True, False),
    "fused_add_rmsnorm": (True, True, True, False),
    "fused_add_layernorm": (False, True, True, True),
}


def _dtypes(device: DeviceInfo) -> list[torch.dtype]:
    return [torch.float16, torch.float32] + ([torch.bfloat16] if device.supports_bf16 else [])


def _norm_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    from llamatelemetry_core.aot import KernelBuild

    t = _TYPES[dtype]
    for hidden in HIDDEN_SIZES:
        config = norm_config(hidden, dtype, device)
        backward = norm_config(hidden, dtype, device, backward=True)
        tag = f"{t},N={hidden},BLOCK={config.block_size},{'single' if config.single_block else 'looped'}"
        for name, (is_rms, residual, weight, bias) in _NORM_VARIANTS.items():
            signature = {
                **dict.fromkeys(("X", "R", "W", "B", "Y", "H"), f"*{t}"),
                "Mean": "*fp32",
                "Rstd": "*fp32",
                "stride_x": "i32",
                "stride_r": "i32",
                "n_cols": "i32",
                "eps": "fp32",
                **dict.fromkeys(
                    (
                        "IS_RMS",
                        "HAS_RESIDUAL",
                        "HAS_WEIGHT",
                        "HAS_BIAS",
                        "STORE_STATS",
                        "SINGLE_BLOCK",
                        "BLOCK_SIZE",
                    ),
                    "constexpr",
                ),
            }
            yield KernelBuild(
                f"triton.{name}_fwd[{tag}]",
                norm._norm_fwd_kernel,
                signature,
                {
                    "IS_RMS": is_rms,
                    "HAS_RESIDUAL": residual,
                    "HAS_WEIGHT": weight,
                    "HAS_BIAS": bias,
                    "STORE_STATS": False,
                    "SINGLE_BLOCK": config.single_block,
                    "BLOCK_SIZE": config.block_size,
                },
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
            signature = {
                **dict.fromkeys(("DY", "X", "W"), f"*{t}"),
                "Mean": "*fp32",
                "Rstd": "*fp32",
                "DRES": f"*{t}",
                "DX": f"*{t}",
                "DW": "*fp32",
                "DB": "*fp32",
                **dict.fromkeys(
                    ("stride_dy", "stride_x", "stride_dres", "n_rows", "n_cols", "rows_per_program"), "i32"
                ),
                **dict.fromkeys(
                    ("IS_RMS", "HAS_WEIGHT", "HAS_BIAS", "HAS_DRES", "SINGLE_BLOCK", "BLOCK_SIZE"), "constexpr"
                ),
            }
            yield KernelBuild(
                f"triton.{name}_bwd[{tag}]",
                norm._norm_bwd_kernel,
                signature,
                {
                    "IS_RMS": is_rms,
                    "HAS_WEIGHT": weight,
                    "HAS_BIAS": bias,
                    "HAS_DRES": residual,
                    "SINGLE_BLOCK": backward.single_block,
                    "BLOCK_SIZE": backward.block_size,
                },
                num_warps=backward.num_warps,
                num_stages=backward.num_stages,
            )


def _softmax_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    from llamatelemetry_core.aot import KernelBuild

    t = _TYPES[dtype]
    for rows, cols in [*((_ROWS, h) for h in HIDDEN_SIZES), (32, VOCAB_SIZE)]:
        config = softmax_config(rows, cols, dtype, device)
        tag = f"{t},{rows}x{cols},BLOCK={config.block_size}"
        if config.single_block:
            yield KernelBuild(
                f"triton.softmax_fwd[{tag}]",
                softmax._softmax_fwd_kernel,
                {"X": f"*{t}", "Y": f"*{t}", "stride_x": "i32", "n_cols": "i32", "BLOCK_SIZE": "constexpr"},
                {"BLOCK_SIZE": config.block_size},
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
        else:
            ints = dict.fromkeys(("stride_x", "n_cols", "chunk_size", "splits"), "i32")
            yield KernelBuild(
                f"triton.softmax_partial_stats[{tag},splits={config.splits}]",
                softmax._softmax_partial_stats_kernel,
                {"X": f"*{t}", "M": "*fp32", "D": "*fp32", **ints, "BLOCK_SIZE": "constexpr"},
                {"BLOCK_SIZE": config.block_size},
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
            yield KernelBuild(
                f"triton.softmax_normalize[{tag},splits={config.splits}]",
                softmax._softmax_normalize_kernel,
                {
                    "X": f"*{t}",
                    "Y": f"*{t}",
                    "M": "*fp32",
                    "D": "*fp32",
                    **ints,
                    "SPLITS_BLOCK": "constexpr",
                    "BLOCK_SIZE": "constexpr",
                },
                {"SPLITS_BLOCK": next_power_of_2(config.splits), "BLOCK_SIZE": config.block_size},
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )
        yield KernelBuild(
            f"triton.softmax_bwd[{tag}]",
            softmax._softmax_bwd_kernel,
            {
                "DY": f"*{t}",
                "Y": f"*{t}",
                "DX": f"*{t}",
                "stride_dy": "i32",
                "n_cols": "i32",
                "SINGLE_BLOCK": "constexpr",
                "BLOCK_SIZE": "constexpr",
            },
            {"SINGLE_BLOCK": config.single_block, "BLOCK_SIZE": config.block_size},
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )


def _add_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    from llamatelemetry_core.aot import KernelBuild

    t = _TYPES[dtype]
    for hidden in HIDDEN_SIZES:
        config = elementwise_config(_ROWS * hidden, dtype, device)
        yield KernelBuild(
            f"triton.add[{t},BLOCK={config.block_size}]",
            add._add_kernel,
            {"A": f"*{t}", "B": f"*{t}", "Out": f"*{t}", "n_elements": "i32", "BLOCK_SIZE": "constexpr"},
            {"BLOCK_SIZE": config.block_size},
            num_warps=config.num_warps,
        )
        strided = {
            "A": f"*{t}",
            "B": f"*{t}",
            "Out": f"*{t}",
            **dict.fromkeys(("n_elements", "size1", "size2", "size3"), "i32"),
            **dict.fromkeys((f"{x}_stride{i}" for x in "ab" for i in range(4)), "i32"),
            "BLOCK_SIZE": "constexpr",
        }
        config = elementwise_config(_ROWS * hidden, dtype, device, strided=True)
        yield KernelBuild(
            f"triton.add_broadcast[{t},BLOCK={config.block_size}]",
            add._add_strided_kernel,
            strided,
            {"BLOCK_SIZE": config.block_size},
            num_warps=config.num_warps,
        )


def _glu_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    from llamatelemetry_core.aot import KernelBuild

    t = _TYPES[dtype]
    for hidden in HIDDEN_SIZES:
        config = glu_config(hidden, dtype, device)
        for name, activation in (("swiglu", 0), ("geglu", 1), ("geglu_tanh", 2)):
            tag = f"{t},BLOCK={config.block_size}"
            yield KernelBuild(
                f"triton.{name}_fwd[{tag}]",
                glu._glu_fwd_kernel,
                {
                    **dict.fromkeys(("G", "U", "Y"), f"*{t}"),
                    **dict.fromkeys(("stride_g", "stride_u", "n_cols"), "i32"),
                    "ACTIVATION": "constexpr",
                    "BLOCK_SIZE": "constexpr",
                },
                {"ACTIVATION": activation, "BLOCK_SIZE": config.block_size},
                num_warps=config.num_warps,
            )
            yield KernelBuild(
                f"triton.{name}_bwd[{tag}]",
                glu._glu_bwd_kernel,
                {
                    **dict.fromkeys(("DY", "G", "U", "DG", "DU"), f"*{t}"),
                    **dict.fromkeys(("stride_dy", "stride_g", "stride_u", "n_cols"), "i32"),
                    "ACTIVATION": "constexpr",
                    "BLOCK_SIZE": "constexpr",
                },
                {"ACTIVATION": activation, "BLOCK_SIZE": config.block_size},
                num_warps=config.num_warps,
            )


def _rope_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    from llamatelemetry_core.aot import KernelBuild

    t = _TYPES[dtype]
    for head_dim in HEAD_DIMS:
        config = rope_config(head_dim // 2, 32, dtype, device)
        for interleaved in (False, True):
            signature = {
                "Q": f"*{t}",
                "K": f"*{t}",
                "Cos": "*fp32",
                "Sin": "*fp32",
                "Pos": "*i64",
                **dict.fromkeys(
                    (
                        "q_stride_t",
                        "q_stride_h",
                        "k_stride_t",
                        "k_stride_h",
                        "cos_stride",
                        "sin_stride",
                        "n_q_heads",
                        "n_k_heads",
                        "rotary_half",
                        "n_positions",
                    ),
                    "i32",
                ),
                **dict.fromkeys(("INTERLEAVED", "INVERSE", "BLOCK_H", "BLOCK_SIZE"), "constexpr"),
            }
            yield KernelBuild(
                f"triton.rope[{t},D={head_dim},{'gptj' if interleaved else 'neox'}]",
                rope._rope_kernel,
                signature,
                {
                    "INTERLEAVED": interleaved,
                    "INVERSE": False,
                    "BLOCK_H": config.chunk_size,
                    "BLOCK_SIZE": config.block_size,
                },
                num_warps=config.num_warps,
            )


def kernel_builds(device: DeviceInfo) -> Iterator[KernelBuild]:
    """Every built-in kernel with the configuration it gets on ``device`` (entry point for the AOT checks)."""
    seen: set[tuple[object, ...]] = set()
    for dtype in _dtypes(device):
        for family in (_add_builds, _norm_builds, _softmax_builds, _glu_builds, _rope_builds):
            for build in family(device, dtype):
                key = (
                    build.kernel,
                    tuple(sorted(build.signature.items())),
                    tuple(sorted(build.constexprs.items())),
                    build.num_warps,
                    build.num_stages,
                )
                if key not in seen:
                    seen.add(key)
                    yield build
