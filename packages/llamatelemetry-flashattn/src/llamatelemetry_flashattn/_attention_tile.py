"""What the attention kernels share: the key range a tile of rows sees and its three phases (masked,
unmasked, masked), the logits of a tile (scale, soft cap, window and bounds mask), the online-softmax update,
and the host-side factors and window bounds they are launched with. Each kernel loads its keys and values its
own way (strided tensors, or pages through a block table) in its own tile step, which it calls from a ``range``
loop on a GPU and a ``while`` loop in the interpreter. The helpers are inlined by Triton: the kernels compile to
the same code as with the steps written out in place."""

from __future__ import annotations

import math

import triton
import triton.language as tl

from llamatelemetry_flashattn.reference import UNBOUNDED, normalize_window

__all__ = [
    "FAR",
    "kernel_scales",
    "key_span",
    "online_softmax",
    "phase_span",
    "tile_logits",
    "unmasked_span",
    "window_bounds",
]

_LOG2E = 1.4426950408889634
FAR = 1 << 30  # an "unbounded" window side, far beyond any sequence length yet safe from int32 overflow


@triton.jit  # type: ignore[untyped-decorator]
def key_span(  # type: ignore[no-untyped-def]
    pid_m, n_rows, group, offset, kv_len, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """``(lo, hi, full_lo, full_hi)`` for the rows ``pid_m * BLOCK_M ..`` of ``n_rows`` (``group`` rows per query,
    query 0 at key position ``offset``): some row sees the keys in [lo, hi), every row those in [full_lo,
    full_hi). ``lo`` is rounded down and ``full_lo`` up, ``full_hi`` down to whole tiles of ``BLOCK_N`` keys."""
    pos_first = (pid_m * BLOCK_M) // group + offset
    pos_last = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_rows) - 1) // group + offset
    lo = tl.maximum(pos_first - window_left, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(pos_last + window_right + 1, kv_len)
    full_lo = tl.maximum(pos_last - window_left, 0)
    full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    full_hi = tl.minimum(pos_first + window_right + 1, kv_len)
    full_hi = (full_hi // BLOCK_N) * BLOCK_N
    return lo, hi, full_lo, full_hi


@triton.jit
def unmasked_span(lo, hi, full_lo, full_hi):  # type: ignore[no-untyped-def]
    """``(mid_lo, mid_hi)``: the whole tiles of [lo, hi) that every row sees (empty when there are none)."""
    mid_lo = tl.minimum(tl.maximum(full_lo, lo), tl.maximum(hi, lo))
    mid_hi = tl.maximum(tl.minimum(full_hi, hi), mid_lo)
    return mid_lo, mid_hi


@triton.jit  # type: ignore[untyped-decorator]
def phase_span(PHASE: tl.constexpr, lo, mid_lo, mid_hi, hi):  # type: ignore[no-untyped-def]
    """``(start, end)`` of a phase: 0 is [lo, mid_lo) (masked), 1 [mid_lo, mid_hi) (unmasked), 2 [mid_hi, hi)
    (masked). The kernels unroll the phases at compile time, so the unmasked loop carries no mask code."""
    if PHASE == 0:
        start = lo
        end = mid_lo
    elif PHASE == 1:
        start = mid_lo
        end = mid_hi
    else:
        start = mid_hi
        end = hi
    return start, end


@triton.jit  # type: ignore[untyped-decorator]
def tile_logits(  # type: ignore[no-untyped-def]
    s,
    cols,
    pos,
    kv_len,
    qk_scale,
    softcap_log2,
    window_left,
    window_right,
    USE_SOFTCAP: tl.constexpr,
    MASKED: tl.constexpr,
):
    """``q k^T`` of a tile in log2 units (soft-capped when asked); in MASKED tiles, keys beyond ``kv_len`` or
    outside each row's window [pos - left, pos + right] are -inf."""
    if USE_SOFTCAP:  # noqa: SIM108 (a constexpr branch: the other one is not compiled)
        # softcap * tanh(x), tanh(x) = 2 * sigmoid(2x) - 1, in log2 units for exp2
        s = softcap_log2 * (2.0 * tl.sigmoid(2.0 * (s * qk_scale)) - 1.0)
    else:
        s = s * qk_scale
    if MASKED:
        visible = (
            (cols[None, :] < kv_len)
            & (cols[None, :] >= pos[:, None] - window_left)
            & (cols[None, :] <= pos[:, None] + window_right)
        )
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def online_softmax(s, m_i, l_i):  # type: ignore[no-untyped-def]
    """``(p, alpha, l, m)``: the tile's probabilities against the new running maximum ``m``, the factor that
    rescales what was accumulated before, and the new running sum ``l``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; exp2(-inf - -inf) would be NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_new


def window_bounds(causal: bool, window_size: tuple[int, int] | None) -> tuple[int, int]:
    """The (left, right) window sides a kernel takes: ``FAR`` for an unbounded side."""
    left, right = normalize_window(window_size, causal)
    return (FAR if left == UNBOUNDED else left), (FAR if right == UNBOUNDED else right)


def kernel_scales(head_dim: int, softmax_scale: float | None, softcap: float | None) -> tuple[float, float]:
    """(qk_scale, softcap_log2): the factors of the logits in log2 units, see :func:`tile_logits`."""
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    if softcap is None:
        return scale * _LOG2E, 0.0
    return scale / softcap, softcap * _LOG2E
