"""What the rotary operations share (:mod:`~llamatelemetry_triton.ops.rope` and
:mod:`~llamatelemetry_triton.ops.rope_paged`): the jitted rotation of one token's heads, and the host-side views
and overlap test of ``q``/``k`` rotated in place.

The rotation is one function so that both operations round alike: each pair is loaded, rotated in fp32 and
rounded once to the tensor's dtype, with the same expression (and so the same fused multiply-adds).
"""

from __future__ import annotations

import math

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import format_shape
from llamatelemetry_triton._compat import tl, triton
from llamatelemetry_triton._dispatch import check_float_tensor

__all__ = [
    "check_rope_args",
    "footprints_may_overlap",
    "pair_offsets",
    "rotate_heads",
    "token_angles",
    "token_positions",
    "token_view",
]


@triton.jit
def token_angles(  # type: ignore[no-untyped-def]
    Cos, Sin, Pos, token, cos_stride, sin_stride, rotary_half, n_positions, d
):
    """``(cos, sin, d_mask)`` of one token: its table rows at features ``d`` in fp32, and which of ``d`` it
    rotates (none for a position outside the tables, whose row reads as cos 1, sin 0)."""
    pos = tl.load(Pos + token).to(tl.int64)
    # Never read outside the tables (the host checks where it can): a position out of range sees no feature.
    # The scalar test goes into the bound rather than into a scalar & block "and", which Triton 3.9's
    # interpreter turns into an integer mask it then rejects.
    pos_ok = (pos >= 0) & (pos < n_positions)
    d_mask = d < tl.where(pos_ok, rotary_half, 0)
    cos = tl.load(Cos + pos * cos_stride + d, mask=d_mask, other=1.0).to(tl.float32)
    sin = tl.load(Sin + pos * sin_stride + d, mask=d_mask, other=0.0).to(tl.float32)
    return cos, sin, d_mask


@triton.jit  # type: ignore[untyped-decorator]
def pair_offsets(d, rotary_half, INTERLEAVED: tl.constexpr):  # type: ignore[no-untyped-def]
    """The features ``(first, second)`` of pair ``d``: ``(2d, 2d + 1)`` in the GPT-J layout, ``(d, d + half)``
    in the GPT-NeoX / Llama one."""
    if INTERLEAVED:
        first = 2 * d
        second = 2 * d + 1
    else:
        first = d
        second = d + rotary_half
    return first, second


@triton.jit  # type: ignore[untyped-decorator]
def rotate_heads(  # type: ignore[no-untyped-def]
    X,
    stride_h,
    n_heads,
    heads,
    first,
    second,
    d_mask,
    cos,
    sin,
    Out,
    out_stride_h,
    n_out,
    BLOCK_H: tl.constexpr,
    COPY: tl.constexpr,
):
    """Rotate, in place, the feature pairs (first, second) of every head of one token of q or k, BLOCK_H heads
    at a time; with COPY, also store the rotated pairs of the first ``n_out`` heads at ``Out`` (heads
    ``out_stride_h`` apart, converted to Out's dtype)."""
    # Loops are `while`, not `range()`: Triton 3.6's interpreter cannot take runtime range() bounds under NumPy 2.4.
    h0 = tl.program_id(0) * 0
    while h0 < n_heads:
        h = h0 + heads
        mask = (h[:, None] < n_heads) & d_mask[None, :]
        base = X + h[:, None] * stride_h
        x1 = tl.load(base + first[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + second[None, :], mask=mask, other=0.0).to(tl.float32)
        y1 = (x1 * cos - x2 * sin).to(X.dtype.element_ty)
        y2 = (x2 * cos + x1 * sin).to(X.dtype.element_ty)
        tl.store(base + first[None, :], y1, mask=mask)
        tl.store(base + second[None, :], y2, mask=mask)
        if COPY:
            out_mask = (h[:, None] < n_out) & d_mask[None, :]
            out = Out + h[:, None] * out_stride_h
            tl.store(out + first[None, :], y1.to(Out.dtype.element_ty), mask=out_mask)
            tl.store(out + second[None, :], y2.to(Out.dtype.element_ty), mask=out_mask)
        h0 += BLOCK_H


def token_positions(q: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Each token's position, ``positions`` broadcast to ``q.shape[:-2]`` (default: ``arange(S)`` along the
    dimension before the heads)."""
    tokens = q.shape[:-2]
    if positions is None:
        seq = torch.arange(tokens[-1], device=q.device)
        return seq.expand(tokens)
    return positions.to(q.device).expand(tokens)


def check_rope_args(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor | None
) -> None:
    """Raise ``TypeError``/:class:`ConfigurationError` unless ``q``, ``k``, the tables and ``positions`` make a
    rotation :func:`~llamatelemetry_triton.ops.rope.triton_rope` can do in place (no host sync on a GPU)."""
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float_tensor(t, name)
    for name, t in (("q", q), ("k", k)):
        # (Not while torch.compile traces: Dynamo cannot trace the query; PyTorch refuses in-place writes
        # through such a view there itself.)
        if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(t) == 1:
            raise ConfigurationError(
                f"expected {name} whose elements each have their own memory (it is rotated in place), got a view "
                f"of shape {format_shape(t.shape)} and strides {list(t.stride())} in which several elements share "
                f"one location (an expanded tensor?); pass {name}.contiguous() or {name}.clone()"
            )
    if q.dim() < 3 or k.dim() != q.dim() or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ConfigurationError(
            f"expected q [..., H_q, D] and k [..., H_k, D] with the same leading dimensions and D (at least "
            f"3 dimensions), got q {format_shape(q.shape)} and k {format_shape(k.shape)}"
        )
    half = cos.shape[-1] if cos.dim() == 2 else -1
    if cos.dim() != 2 or sin.shape != cos.shape or not 0 < 2 * half <= q.shape[-1]:
        raise ConfigurationError(
            f"expected cos and sin of shape [max_positions, rotary_dim / 2] with rotary_dim <= head_dim "
            f"{q.shape[-1]}, got cos {format_shape(cos.shape)} and sin {format_shape(sin.shape)}; build them with "
            "rope_cos_sin(), or pass cos[..., :rotary_dim // 2] of a Hugging Face style table"
        )
    devices = {t.device for t in (q, k, cos, sin)}
    if len(devices) > 1:
        raise ConfigurationError(f"expected q, k, cos and sin on one device, got {sorted(map(str, devices))}")
    if positions is not None:
        given: object = positions  # validated at run time whatever the annotation says
        if (
            not isinstance(given, torch.Tensor)
            or given.is_floating_point()
            or given.is_complex()
            or given.dtype == torch.bool
        ):
            raise ConfigurationError(f"expected positions to be an integer tensor, got {positions!r:.60}")
        try:
            if torch.broadcast_shapes(positions.shape, q.shape[:-2]) != q.shape[:-2]:  # type: ignore[no-untyped-call]
                raise RuntimeError("positions has more or larger dimensions than the tokens")
        except RuntimeError:
            raise ConfigurationError(
                f"expected positions broadcastable to the token dimensions {format_shape(q.shape[:-2])} of q, "
                f"got {format_shape(positions.shape)}"
            ) from None
        # Checking a GPU tensor would synchronize; a traced graph cannot branch on values.
        if positions.device.type == "cpu" and positions.numel() and not torch.compiler.is_compiling():
            low, high = int(positions.min()), int(positions.max())
            if low < 0 or high >= cos.shape[0]:
                raise ConfigurationError(
                    f"expected positions in [0, {cos.shape[0]}) (the rows of cos/sin), got values in [{low}, {high}]; "
                    "build longer tables with rope_cos_sin()"
                )
    elif q.shape[-3] > cos.shape[0]:
        raise ConfigurationError(
            f"expected at most {cos.shape[0]} positions (the rows of cos/sin), got a sequence of {q.shape[-3]}"
        )


def token_view(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as ``[tokens, H, D]`` sharing its memory with unit feature stride, or ``None`` if impossible."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return None
    tokens = math.prod(t.shape[:-2])  # explicit: view(-1, ...) is ambiguous for zero heads
    try:
        return t.view(tokens, t.shape[-2], t.shape[-1])
    except RuntimeError:
        return None


def footprints_may_overlap(q3: torch.Tensor, k3: torch.Tensor) -> bool:
    """Whether ``q3`` and ``k3`` (``[tokens, H, D]`` views) may share memory.

    Whole heads count, not only their rotated features: the in-place contract writes all of ``q`` and then all
    of ``k``, so a feature of ``k`` left unrotated still overwrites a rotated one of ``q`` it shares memory with.
    Exact for views with one token stride (the slices of a fused QKV projection, whose storage ranges
    interleave but whose elements do not); any other layout sharing storage is assumed to overlap.
    """
    if q3.numel() == 0 or k3.numel() == 0 or not torch._C._overlaps(q3, k3):
        return False
    size_q, size_k = q3.element_size(), k3.element_size()
    span_q = ((q3.shape[1] - 1) * q3.stride(1) + q3.shape[2]) * size_q
    span_k = ((k3.shape[1] - 1) * k3.stride(1) + k3.shape[2]) * size_k
    shift = k3.data_ptr() - q3.data_ptr()
    if q3.shape[0] == 1 and k3.shape[0] == 1:
        # One token (a decode step of batch 1): the token strides say nothing (a view of one row may carry any),
        # and the two heads' byte ranges decide.
        return shift < span_q and shift + span_k > 0
    step = q3.stride(0) * size_q
    if q3.stride(0) * size_q != k3.stride(0) * size_k or step <= 0:
        return True
    # k's token t' meets q's token t when [0, span_q) and shift + m*step + [0, span_k) intersect, m = t' - t.
    m_low = (-span_k - shift) // step + 1
    m_high = -((shift - span_q) // step) - 1
    tokens = q3.shape[0]
    return max(m_low, -(tokens - 1)) <= min(m_high, tokens - 1)
