"""What the attention kernels share: the logits of a tile (scale, soft cap, window and bounds mask), the
online-softmax update, and the host-side factors and window bounds they are launched with. Each kernel loads
its keys and values its own way (strided tensors, or pages through a block table).

The paged kernel's tile step (:mod:`._paged_tile`) forms its logits inline, the same way as :func:`tile_logits`:
called there, the helper changed ptxas's register allocation of two sm_90 builds (a few more local-memory
spills), while here the SASS of every build stays the same but for instruction order. Keep the two in step."""

from __future__ import annotations

import math

import triton
import triton.language as tl

from llamatelemetry_flashattn.reference import UNBOUNDED, normalize_window

__all__ = ["FAR", "kernel_scales", "online_softmax", "tile_logits", "window_bounds"]

_LOG2E = 1.4426950408889634
FAR = 1 << 30  # an "unbounded" window side, far beyond any sequence length yet safe from int32 overflow


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
