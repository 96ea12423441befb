"""The second step of split-KV paged attention (flash-decoding, Dao et al. 2023): merging the parts.

With split-KV, :mod:`.paged_kernel` cuts each program's key range into ``num_splits`` parts and writes, per part,
token and head, the normalised partial output ``o_s`` (``[num_splits, num_tokens, H, D]`` float32) and the
log2-sum-exp2 of its logits ``lse_s`` (``[num_splits, num_tokens, H]`` float32, ``-inf`` for a part that saw no
key). The result is ``sum_s w_s o_s / sum_s w_s`` with ``w_s = exp2(lse_s - max_s lse_s)``; a row that saw no
key in any part is zeros, as in the reference. One program merges one (token, head).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from llamatelemetry_core.device import DeviceInfo
from llamatelemetry_core.environment import pdl_capable, programmatic_launch
from llamatelemetry_flashattn.paged_tiles import MERGE_BLOCK_S, merge_warps
from llamatelemetry_flashattn.tiles import padded_head_dim

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild

__all__ = ["AOT_HEAD_DIMS", "aot_build", "aot_builds", "merge_splits"]


@triton.jit(do_not_specialize=["stride_ps", "stride_ls", "num_splits"])  # type: ignore[untyped-decorator]
def _merge_splits_kernel(  # type: ignore[no-untyped-def]
    PartialOut,
    PartialLse,
    Out,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    stride_ot,
    stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """One (token, head): the partial outputs weighted by exp2(lse_s - max lse), normalised; zeros if none saw a key."""
    if USE_PDL:  # launched as a dependent: wait for the attention kernel's parts, then let the next one start
        gdc_wait()
        gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    lse = tl.load(PartialLse + splits * stride_ls + token * stride_lt + head, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.math.exp2(lse - top_safe)  # 0 for parts without keys
    total = tl.sum(weight, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    ptrs = PartialOut + splits[:, None] * stride_ps + token * stride_pt + head * stride_ph + offs_d[None, :]
    parts = tl.load(ptrs, mask=split_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(Out + token * stride_ot + head * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)


def merge_splits(partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Merge ``partial`` ``[num_splits, num_tokens, H, D]`` and ``lse`` ``[num_splits, num_tokens, H]`` (float32,
    as the attention kernel writes them) into ``out`` ``[num_tokens, H, D]`` (any float dtype, ``D`` contiguous).

    Inputs are the attention launcher's own buffers and are not validated here; nothing is read on the host.
    """
    num_splits, num_tokens, heads, _ = partial.shape
    block_d = padded_head_dim(head_dim)
    pdl = programmatic_launch(out)
    _merge_splits_kernel[(num_tokens, heads)](
        partial,
        lse,
        out,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        out.stride(0),
        out.stride(1),
        num_splits,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        # One width for every split count (masked lanes load nothing): a kernel per power of two would be
        # compiled whenever a longer context first asks for more splits.
        BLOCK_S=MERGE_BLOCK_S,
        USE_PDL=pdl,
        launch_pdl=pdl,
        num_warps=merge_warps(block_d),
        enable_fp_fusion=True,  # the default up to Triton 3.9; 3.10 turns it off
    )
    return out


# --- ahead-of-time builds (``python -m llamatelemetry_core.aot``, through llamatelemetry_flashattn.aot) ---------

AOT_HEAD_DIMS = (64, 128, 256)
_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_build(head_dim: int, dtype: torch.dtype, *, pdl: bool = False) -> KernelBuild:
    """The merge kernel's build for ``head_dim`` writing ``dtype``; ``pdl``: with grid dependency control, as it is
    launched on compute capability 9.0 and later (otherwise the same on every device)."""
    from llamatelemetry_core.aot import KernelBuild, kernel_signature

    block_d = padded_head_dim(head_dim)
    types = {"PartialOut": "*fp32", "PartialLse": "*fp32", "Out": "*" + _TRITON_DTYPES[dtype]}
    signature = kernel_signature(_merge_splits_kernel, types)  # strides and the split count: i32
    constexprs: dict[str, int | float | bool | str] = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d,
        "BLOCK_S": MERGE_BLOCK_S,
        "USE_PDL": pdl,
    }
    name = f"flashattn.paged_merge[{_TRITON_DTYPES[dtype]},d={head_dim}]"
    return KernelBuild(name, _merge_splits_kernel, signature, constexprs, num_warps=merge_warps(block_d), num_stages=1)


def aot_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """The merge kernel at head dims 64, 128 and 256 writing fp16 (its resources do not depend on the device or
    on the output dtype: one set of builds bounds them all); nothing for other dtypes."""
    if dtype == torch.float16:
        for head_dim in AOT_HEAD_DIMS:
            yield aot_build(head_dim, dtype, pdl=pdl_capable(device))
