"""Special values every attention implementation must treat alike: non-finite queries, queries that see no key.

The reference defines both (:mod:`.reference`): a query row holding NaN or an infinity gives a NaN output row,
unless the row sees no key at all, which gives zeros whatever the query holds. Fused kernels do not all agree:
SDPA's CPU kernel returns zeros for a NaN query row, and GPU ``max`` instructions return the non-NaN operand, so a
kernel's running maximum can skip a NaN. Each fast path's output goes through :func:`propagate_query_nan`, which
costs one reduction over ``q`` and one add over the output (on a CPU, one sum over ``q`` in the common case).
"""

from __future__ import annotations

import math

import torch

from llamatelemetry_flashattn.reference import normalize_window

__all__ = ["propagate_query_nan", "rows_with_keys"]


def rows_with_keys(
    q_len: int, kv_len: int, *, causal: bool, window_size: tuple[int, int] | None, device: torch.device
) -> torch.Tensor | None:
    """Bool ``[q_len, 1, 1]``: True where query ``i`` sees at least one key; ``None`` when every query does.

    Query ``i`` sits at position ``p = i + kv_len - q_len`` and sees keys ``max(0, p - left) ..
    min(kv_len - 1, p + right)`` (an unbounded side reaches the end), computed without building the mask.
    """
    if kv_len == 0:
        return torch.zeros(q_len, 1, 1, dtype=torch.bool, device=device)
    if q_len <= kv_len:
        return None  # every position p lies in [0, kv_len), and a window always includes p itself
    left, right = normalize_window(window_size, causal)
    pos = torch.arange(q_len, device=device) + (kv_len - q_len)
    low = torch.zeros_like(pos) if left == -1 else (pos - left).clamp(min=0)
    high = torch.full_like(pos, kv_len - 1) if right == -1 else (pos + right).clamp(max=kv_len - 1)
    return (low <= high).view(q_len, 1, 1)


def propagate_query_nan(
    q: torch.Tensor,
    out: torch.Tensor,
    *,
    causal: bool,
    window_size: tuple[int, int] | None,
    kv_len: int,
    native_on_cuda: bool = False,
) -> torch.Tensor:
    """``out`` (``[B, Sq, H, D]``) with NaN rows wherever ``q``'s row holds NaN or an infinity and sees a key.

    An infinite query element makes every logit of the row infinite or NaN, so IEEE softmax gives NaN.
    ``native_on_cuda``: the kernel that produced ``out`` gives those NaN rows by itself on a GPU when every row
    sees a key (measured on an H200 for SDPA's cuDNN, flash and memory-efficient kernels and the Triton kernel,
    ``benchmarks/flashattn/probe_dispatch_cost.py``; the GPU tests check it), so the pass is skipped there.
    """
    wide = torch.float64 if q.dtype in (torch.float32, torch.float64) else torch.float32
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and math.isfinite(q.sum(dtype=wide).item()):
        # The common case on a CPU, answered by one reduction: a finite total means no NaN or infinity (a total
        # that overflows takes the exact path below). On a GPU reading the total would synchronize.
        return out
    seen = rows_with_keys(q.shape[1], kv_len, causal=causal, window_size=window_size, device=q.device)
    if seen is None and native_on_cuda and q.device.type == "cuda":
        return out  # the pass cost 0.06 ms at B2 L2048 H32 D64 on an H200, 60% of the cuDNN kernel's time
    if seen is None:
        # Every row sees a key: one reduction over q and one add over out. A row's sum is NaN or infinite exactly
        # when the row holds NaN or an infinity (summed in a wider type, finite values cannot overflow), and
        # 0 * sum is then NaN, else zero, so adding it changes nothing else. On an H200 at L8192 the automatic
        # path reached 0.74x of cuDNN alone with masks and a copy of out, and 0.89x with this.
        poison = q.sum(dim=-1, keepdim=True, dtype=wide).mul_(0).to(out.dtype)  # [B, Sq, H, 1]
        # In place unless autograd needs out as it is (SDPA's backward reads its output).
        return out + poison if out.requires_grad else out.add_(poison)
    nan_rows = (~q.isfinite()).any(dim=-1, keepdim=True) & seen  # [B, Sq, H, 1]
    return out.masked_fill(nan_rows, float("nan"))
