"""Rotary position embedding (RoPE), applied in place to queries and keys at given positions.

Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding" (2021). For a token at position
``p``, each pair ``(x1, x2)`` of a head's first ``rotary_dim`` features is rotated by the angle
``p * theta_i``, with ``theta_i = base^(-2i / rotary_dim)``::

    x1' = x1 * cos - x2 * sin
    x2' = x2 * cos + x1 * sin

Pairs are ``(x[i], x[i + rotary_dim/2])`` in the GPT-NeoX / Llama layout (the default) and ``(x[2i], x[2i+1])``
in the GPT-J layout (``interleaved=True``); features past ``rotary_dim`` are left alone.

Layouts: ``q`` is ``[..., H_q, D]`` and ``k`` is ``[..., H_k, D]`` with the same leading (token) dimensions,
e.g. ``[B, S, H, D]`` or ``[T, H, D]``; ``cos`` and ``sin`` are ``[max_positions, rotary_dim / 2]`` tables
(:func:`rope_cos_sin` builds them); ``positions`` is an integer tensor broadcastable to the token dimensions
(default: ``arange(S)`` along the dimension before the heads). One program per token loads its ``cos``/``sin``
row once and rotates every query and key head; the backward is the inverse rotation (``sin`` negated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import check_non_negative_int
from llamatelemetry_triton._aot_shapes import HEAD_DIMS, TYPE_NAMES, kernel_build
from llamatelemetry_triton._bounds import grid_rows, int_argument, require_elements
from llamatelemetry_triton._compat import tl, triton
from llamatelemetry_triton._dispatch import (
    TRITON_DTYPES,
    TritonOperation,
    compute_dtype,
    cuda_in_triton_dtypes,
    described,
    device_info,
    needs_autograd,
    run_op,
    triton_errors,
)
from llamatelemetry_triton._launch import on_device
from llamatelemetry_triton.heuristics import rope_config
from llamatelemetry_triton.ops._rope_tile import (
    check_rope_args,
    footprints_may_overlap,
    pair_offsets,
    rotate_heads,
    token_angles,
    token_positions,
    token_view,
)
from llamatelemetry_triton.registry import BuiltinEntry, KernelConfig

if TYPE_CHECKING:
    from collections.abc import Iterator

    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = ["RopeFunction", "rope_cos_sin", "rope_reference", "triton_rope"]


def rope_cos_sin(
    max_positions: int,
    rotary_dim: int,
    base: float = 10000.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``cos`` and ``sin`` tables, each ``[max_positions, rotary_dim // 2]``, for :func:`triton_rope`.

    Raises :class:`ConfigurationError` for a ``max_positions`` below 0, a ``rotary_dim`` that is not a positive
    even integer, a ``base`` that is not a finite number > 0, or a ``dtype`` that is not floating point.
    """
    check_non_negative_int(max_positions, "max_positions")
    given: object = rotary_dim  # validated at run time whatever the annotation says
    if isinstance(given, bool) or not isinstance(given, int) or given <= 0 or given % 2:
        raise ConfigurationError(f"expected rotary_dim to be a positive even integer, got {rotary_dim!r}")
    given_base: object = base
    if (
        isinstance(given_base, bool)
        or not isinstance(given_base, int | float)
        or not math.isfinite(given_base)
        or given_base <= 0
    ):
        raise ConfigurationError(f"expected base to be a finite number > 0 (10000.0 for Llama), got {base!r}")
    given_dtype: object = dtype
    if not isinstance(given_dtype, torch.dtype) or not given_dtype.is_floating_point:
        raise ConfigurationError(f"expected dtype to be a floating-point torch.dtype, got {dtype!r}")
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64, device=device), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate ``x`` ([..., H, D]) by per-token ``cos``/``sin`` ([..., 1, rotary_dim/2]) in their dtype."""
    half = cos.shape[-1]
    xf = x.to(cos.dtype)
    rot, rest = xf[..., : 2 * half], xf[..., 2 * half :]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, rest), dim=-1).to(x.dtype)


def _table_rows(table: torch.Tensor, pos: torch.Tensor, fill: float) -> torch.Tensor:
    """``table[pos]``, with ``fill`` in the rows of positions outside the table (``[*pos.shape, table.shape[1]]``)."""
    inside = (pos >= 0) & (pos < table.shape[0])
    if table.shape[0] == 0:
        return torch.full((*pos.shape, table.shape[1]), fill, dtype=table.dtype, device=table.device)
    rows = table[torch.where(inside, pos, 0)]
    return torch.where(inside.unsqueeze(-1), rows, torch.full((), fill, dtype=table.dtype, device=table.device))


def rope_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of ``q`` and ``k`` (the inputs are not modified).

    A position outside the tables leaves its token unrotated (equal in value for finite inputs), as in the kernel
    (:func:`triton_rope` refuses such positions when they are on the CPU; on a GPU, checking them would
    synchronize): the tables are never indexed out of range, which on a GPU would be a device-side assert that ends
    the process's CUDA context.
    """
    pos = token_positions(q, positions).long()
    compute = torch.promote_types(compute_dtype(q), compute_dtype(k))
    c = _table_rows(cos, pos, 1.0).to(compute).unsqueeze(-2)
    s = _table_rows(sin, pos, 0.0).to(compute).unsqueeze(-2)
    return _rotate(q, c, s, interleaved), _rotate(k, c, s, interleaved)


def _rope_reference_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    q_rot, k_rot = rope_reference(q, k, cos, sin, positions, interleaved)
    return q.copy_(q_rot), k.copy_(k_rot)


@triton.jit  # type: ignore[untyped-decorator]
def _rope_kernel(  # type: ignore[no-untyped-def]
    Q,
    K,
    Cos,
    Sin,
    Pos,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    cos_stride,
    sin_stride,
    n_q_heads,
    n_k_heads,
    rotary_half,
    n_positions,
    INTERLEAVED: tl.constexpr,
    INVERSE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_SIZE)
    cos, sin, d_mask = token_angles(Cos, Sin, Pos, token, cos_stride, sin_stride, rotary_half, n_positions, d)
    if INVERSE:
        sin = -sin
    first, second = pair_offsets(d, rotary_half, INTERLEAVED)
    heads = tl.arange(0, BLOCK_H)
    Q = Q + token * q_stride_t
    K = K + token * k_stride_t
    rotate_heads(Q, q_stride_h, n_q_heads, heads, first, second, d_mask, cos, sin, Q, 0, 0, BLOCK_H, False)
    rotate_heads(K, k_stride_h, n_k_heads, heads, first, second, d_mask, cos, sin, K, 0, 0, BLOCK_H, False)


def _rope_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    interleaved: bool,
    inverse: bool,
) -> None:
    if q.numel() == 0 and k.numel() == 0:
        return
    q3, k3 = token_view(q), token_view(k)
    if q3 is None or k3 is None or footprints_may_overlap(q3, k3):
        # No [tokens, H, D] view, or q and k share memory: rotate private copies and write them back, q first
        # and then k, which is what the reference's two copies do (each rotated once, from the inputs' values).
        q_tmp, k_tmp = q.clone(), k.clone()
        _rope_launch(q_tmp, k_tmp, cos, sin, positions, interleaved, inverse)
        q.copy_(q_tmp)
        k.copy_(k_tmp)
        return
    cos2 = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin2 = sin if sin.stride(-1) == 1 else sin.contiguous()
    pos = positions.reshape(-1)
    rotary_half = cos.shape[-1]
    config = rope_config(rotary_half, max(q3.shape[1], k3.shape[1]), q.dtype, device_info(q.device))
    with on_device(q):
        _rope_kernel[(q3.shape[0],)](
            q3,
            k3,
            cos2,
            sin2,
            pos,
            q3.stride(0),
            q3.stride(1),
            k3.stride(0),
            k3.stride(1),
            cos2.stride(0),
            sin2.stride(0),
            q3.shape[1],
            k3.shape[1],
            rotary_half,
            cos.shape[0],
            INTERLEAVED=interleaved,
            INVERSE=inverse,
            BLOCK_H=config.chunk_size,
            BLOCK_SIZE=config.block_size,
            num_warps=config.num_warps,
            enable_fp_fusion=True,
        )


# The launcher is the custom op; it writes q and k in place and returns nothing, so its fake has nothing to build.
_rope_op = torch.library.custom_op("llamatelemetry::triton_rope_", _rope_launch, mutates_args=("q", "k"))
_rope_op.register_fake(lambda *_: None)


class RopeFunction(torch.autograd.Function):
    """In-place rotation of ``q`` and ``k``; the backward rotates the gradients back."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        interleaved: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        run_op(torch.ops.llamatelemetry.triton_rope_, _rope_launch, q, k, cos, sin, positions, interleaved, False)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin, positions)
        ctx.interleaved = interleaved
        return q, k

    @staticmethod
    def backward(ctx: Any, dq: torch.Tensor, dk: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos, sin, positions = ctx.saved_tensors
        dq, dk = dq.clone(), dk.clone()
        run_op(torch.ops.llamatelemetry.triton_rope_, _rope_launch, dq, dk, cos, sin, positions, ctx.interleaved, True)
        return dq, dk, None, None, None, None


@triton_errors("rope")
def _rope_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    pos = token_positions(q, positions).contiguous()
    if needs_autograd(q, k):
        q_out, k_out = RopeFunction.apply(q, k, cos, sin, pos, interleaved)  # type: ignore[no-untyped-call]
        return q_out, k_out
    run_op(torch.ops.llamatelemetry.triton_rope_, _rope_launch, q, k, cos, sin, pos, interleaved, False)
    return q, k


def _unsupported(q: torch.Tensor, k: torch.Tensor) -> str | None:
    if k.dtype not in TRITON_DTYPES:
        return f"k is {k.dtype}; the kernel rotates float16, bfloat16 and float32"
    return None


ROPE = TritonOperation(
    "triton.rope",
    _rope_reference_inplace,
    _rope_triton,
    describe=lambda q, k, cos, sin, positions, interleaved: described(
        q, k, cos, sin, triton_unsupported=_unsupported(q, k)
    ),
    traceable=lambda q, k, *_: cuda_in_triton_dtypes(q, k),
    aliases=("rope",),
)


def triton_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    interleaved: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` (``[..., H_q, D]``) and ``k`` (``[..., H_k, D]``) in place; returns ``(q, k)``.

    ``cos``/``sin`` are ``[max_positions, rotary_dim / 2]`` (see :func:`rope_cos_sin`); ``positions`` holds
    each token's position (broadcastable to ``q.shape[:-2]``; default ``arange(S)`` over ``q.shape[-3]``).
    ``q`` and ``k`` may be strided views (of a fused QKV projection, say); views that share memory are rotated
    as the reference does (each from the inputs' values, ``q`` written first), and a view in which several
    elements share one location (an expanded tensor) raises :class:`ConfigurationError`. Differentiable
    (in-place rules apply: ``q`` and ``k`` must not be leaves that require grad). Positions outside the tables
    leave a token unrotated on GPU (checking would synchronize); on CPU they raise :class:`ConfigurationError`.
    """
    check_rope_args(q, k, cos, sin, positions)
    return ROPE(q, k, cos, sin, positions, bool(interleaved), backend=backend)  # type: ignore[no-any-return]


# --- ahead-of-time builds ----------------------------------------------------------------------------------


def aot_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """Every build of this module's kernels as they would be launched on ``device`` in ``dtype``, for the
    representative shapes (the ahead-of-time checks, :mod:`llamatelemetry_triton.aot`)."""
    t = TYPE_NAMES[dtype]
    types = {"Q": f"*{t}", "K": f"*{t}", "Cos": "*fp32", "Sin": "*fp32", "Pos": "*i64"}  # strides, counts: i32
    for head_dim in HEAD_DIMS:
        config = rope_config(head_dim // 2, 32, dtype, device)
        for interleaved in (False, True):
            yield kernel_build(
                f"triton.rope[{t},D={head_dim},{'gptj' if interleaved else 'neox'}]",
                _rope_kernel,
                types,
                {
                    "INTERLEAVED": interleaved,
                    "INVERSE": False,
                    "BLOCK_H": config.chunk_size,
                    "BLOCK_SIZE": config.block_size,
                },
                num_warps=config.num_warps,
            )


# --- registry entries ---------------------------------------------------------------------------------------


def _rope_bounds(args: Mapping[str, Any], grid: tuple[int, ...]) -> None:
    tokens = grid_rows(grid)
    half = int_argument(args, "rotary_half", "rope")
    if tokens == 0 or half == 0:
        return
    require_elements(args, "Pos", tokens, "rope", f"one position per token, {tokens} tokens")
    for name, heads, stride_t, stride_h in (
        ("Q", "n_q_heads", "q_stride_t", "q_stride_h"),
        ("K", "n_k_heads", "k_stride_t", "k_stride_h"),
    ):
        h = int_argument(args, heads, "rope")
        if h:
            extent = (
                (tokens - 1) * int_argument(args, stride_t, "rope")
                + (h - 1) * int_argument(args, stride_h, "rope")
                + 2 * half
            )
            require_elements(args, name, extent, "rope", f"{tokens} tokens x {h} heads, rotary_half {half}")
    rows = int_argument(args, "n_positions", "rope")
    for name, stride in (("Cos", "cos_stride"), ("Sin", "sin_stride")):
        if rows:
            extent = (rows - 1) * int_argument(args, stride, "rope") + half
            require_elements(args, name, extent, "rope", f"{rows} table rows")


def registry_entries() -> dict[str, BuiltinEntry]:
    """This module's kernels in the registry (``get_kernel(name)``): kernel, default launch config, bounds check."""
    config = KernelConfig("rope", 64, 4, 1, description="rotary embedding of q and k in place")
    return {"rope": (_rope_kernel, config, _rope_bounds)}
