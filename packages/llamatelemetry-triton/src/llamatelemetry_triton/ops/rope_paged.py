"""Rotary positions and the paged KV store in one launch: rotate ``q`` and ``k`` in place, store ``k`` and ``v``.

What an attention layer of a paged decode step does between its q/k/v projection and attention, as one kernel
instead of two (:func:`~llamatelemetry_triton.ops.rope.triton_rope`, then the cache's paged write): for every
token ``t``, ``q[t]`` and ``k[t]`` are rotated in place exactly as ``triton_rope`` rotates them (the same jitted
rotation: fp32 arithmetic, one rounding to the tensors' dtype), and, unless ``slot_mapping[t]`` is ``PAD_SLOT``
(a padding token of a captured graph), the rotated ``k[t]`` and ``v[t]`` are stored at slot ``s``:
``key_cache[s // page_size, s % page_size] = k[t]``, the same for values. At batch-1 decode the two kernels are
each a few microseconds of launch and latency; one launch saves one of each per layer.

Layouts: ``q`` ``[tokens, H_q, D]``, ``k`` and ``v`` ``[tokens, H_kv, D]`` (views with unit feature stride, the
slices of a fused QKV projection for instance), ``cos``/``sin`` ``[max_positions, rotary_dim / 2]``
(:func:`~llamatelemetry_triton.ops.rope.rope_cos_sin`), ``positions`` integer ``[tokens]``; the store is core's
paged layout (:class:`llamatelemetry_core.kv_layout.PagedKV`, ``[num_blocks, page_size, H_kv, D]``) with
``slot_mapping`` int64 ``[tokens]``. Unquantized storage of the tensors' dtype only (fp16, bf16, fp32): a
quantized store computes per-head scales from the rotated keys, which the cache's own write does; such a call
is refused with the reason (:func:`rope_paged_write_refusal`), and the caller makes the two calls.

The kernel runs three programs per token, which at decode run side by side: one rotates the query heads, one
the key heads and stores them (and the features past ``rotary_dim``), one stores the value heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from llamatelemetry_core.environment import pdl_capable, programmatic_launch
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.kv_layout import PAD_SLOT, PagedKV
from llamatelemetry_core.validation import dtype_name, format_shape
from llamatelemetry_triton._aot_shapes import HEAD_DIMS, TYPE_NAMES, kernel_build
from llamatelemetry_triton._bounds import grid_rows, int_argument, require_elements
from llamatelemetry_triton._compat import gdc_launch_dependents, gdc_wait, tl, triton
from llamatelemetry_triton._dispatch import (
    TritonOperation,
    cuda_in_triton_dtypes,
    described,
    device_info,
    needs_autograd,
    run_op,
    triton_errors,
)
from llamatelemetry_triton._launch import on_device
from llamatelemetry_triton.heuristics import rope_config, rope_store_tile
from llamatelemetry_triton.ops._rope_tile import (
    check_rope_args,
    footprints_may_overlap,
    pair_offsets,
    rotate_heads,
    token_angles,
    token_positions,
)
from llamatelemetry_triton.ops.rope import rope_reference
from llamatelemetry_triton.registry import BuiltinEntry, KernelConfig

if TYPE_CHECKING:
    from collections.abc import Iterator

    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = ["rope_paged_write_reference", "rope_paged_write_refusal", "triton_rope_paged_write"]

_STORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    q_rot, k_rot = rope_reference(q, k, cos, sin, positions, interleaved)
    q.copy_(q_rot)
    k.copy_(k_rot)
    # The paged write of an unquantized store: each kept token's heads become the row of its slot.
    kept = slot_mapping >= 0
    slots = slot_mapping[kept]
    for store, new in ((key_cache, k), (value_cache, v)):
        store.view(-1, *store.shape[2:]).index_copy_(0, slots, new[kept].to(store.dtype))
    return q, k


def rope_paged_write_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    cache: PagedKV,
    slot_mapping: torch.Tensor,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification: :func:`~llamatelemetry_triton.ops.rope.rope_reference` written back into ``q`` and
    ``k``, then the rotated ``k`` and ``v`` stored at ``slot_mapping`` (``PAD_SLOT`` skipped); returns ``(q, k)``."""
    return _reference(q, k, v, cos, sin, positions, cache.key_cache, cache.value_cache, slot_mapping, bool(interleaved))


@triton.jit  # type: ignore[untyped-decorator]
def _store_heads(Src, src_stride_h, Dst, n_stored, dims, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr):  # type: ignore[no-untyped-def]
    """Copy features ``dims`` of the first ``n_stored`` heads at ``Src`` to the cache row at ``Dst`` (heads
    ``HEAD_DIM`` apart), BLOCK_H heads at a time."""
    heads = tl.arange(0, BLOCK_H)
    d_mask = dims < HEAD_DIM
    h0 = tl.program_id(0) * 0
    while h0 < n_stored:
        h = h0 + heads
        mask = (h[:, None] < n_stored) & d_mask[None, :]
        x = tl.load(Src + h[:, None] * src_stride_h + dims[None, :], mask=mask, other=0.0)
        tl.store(Dst + h[:, None] * HEAD_DIM + dims[None, :], x.to(Dst.dtype.element_ty), mask=mask)
        h0 += BLOCK_H


@triton.jit  # type: ignore[untyped-decorator]
def _rope_paged_write_kernel(  # type: ignore[no-untyped-def]
    Q,
    K,
    V,
    KeyCache,
    ValueCache,
    Cos,
    Sin,
    Pos,
    SlotMapping,
    q_stride_t,
    q_stride_h,
    k_stride_t,
    k_stride_h,
    v_stride_t,
    v_stride_h,
    cos_stride,
    sin_stride,
    n_q_heads,
    n_kv_heads,
    rotary_half,
    n_positions,
    HEAD_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    PARTIAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_HV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    if USE_PDL:  # launched as a dependent: wait for the kernel before (it writes q, k and v)
        gdc_wait()
        gdc_launch_dependents()  # nothing long here: the next kernel may start and wait for this one
    token = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)  # 0: the query heads, 1: the key heads, 2: the value heads
    slot = tl.load(SlotMapping + token)
    # A padding token (slot < 0) stores no head. The scalar test goes into the bound, not into a block & scalar
    # "and", which Triton 3.9's interpreter turns into an integer mask it then rejects.
    n_stored = tl.where(slot >= 0, n_kv_heads, 0)
    # The store is contiguous, [num_blocks * page_size, H_kv, D]: a slot is a row.
    row = tl.maximum(slot, 0) * n_kv_heads * HEAD_DIM
    if part == 2:
        _store_heads(V + token * v_stride_t, v_stride_h, ValueCache + row, n_stored, tl.arange(0, BLOCK_D),
                     HEAD_DIM, BLOCK_HV)  # fmt: skip
    else:
        d = tl.arange(0, BLOCK_SIZE)
        cos, sin, d_rotated = token_angles(Cos, Sin, Pos, token, cos_stride, sin_stride, rotary_half, n_positions, d)
        first, second = pair_offsets(d, rotary_half, INTERLEAVED)
        heads = tl.arange(0, BLOCK_H)
        if part == 0:
            Qt = Q + token * q_stride_t
            rotate_heads(Qt, q_stride_h, n_q_heads, heads, first, second, d_rotated, cos, sin, Qt, 0, 0, BLOCK_H,
                         False)  # fmt: skip
        else:
            # Every key pair is stored: a position outside the tables (unchecked on a GPU) reads cos 1, sin 0, so
            # its key is stored unrotated, as triton_rope leaves it (equal in value for finite inputs).
            Kt = K + token * k_stride_t
            rotate_heads(Kt, k_stride_h, n_kv_heads, heads, first, second, d < rotary_half, cos, sin,
                         KeyCache + row, HEAD_DIM, n_stored, BLOCK_H, True)  # fmt: skip
            if PARTIAL:  # the features past rotary_dim, stored as they are
                _store_heads(Kt, k_stride_h, KeyCache + row, n_stored, 2 * rotary_half + tl.arange(0, BLOCK_D),
                             HEAD_DIM, BLOCK_HV)  # fmt: skip


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    interleaved: bool,
) -> None:
    tokens, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if tokens == 0:
        return
    v = v if v.stride(-1) == 1 else v.contiguous()
    cos2 = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin2 = sin if sin.stride(-1) == 1 else sin.contiguous()
    rotary_half = cos.shape[-1]
    config = rope_config(rotary_half, max(n_q_heads, n_kv_heads), q.dtype, device_info(q.device))
    block_hv, block_d = rope_store_tile(n_kv_heads, head_dim)
    pdl = programmatic_launch(q)
    with on_device(q):
        _rope_paged_write_kernel[(tokens, 3)](
            q, k, v, key_cache, value_cache, cos2, sin2, positions, slot_mapping,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos2.stride(0), sin2.stride(0), n_q_heads, n_kv_heads, rotary_half, cos.shape[0],
            HEAD_DIM=head_dim,
            INTERLEAVED=interleaved,
            PARTIAL=2 * rotary_half < head_dim,
            BLOCK_H=config.chunk_size,
            BLOCK_SIZE=config.block_size,
            BLOCK_HV=block_hv,
            BLOCK_D=block_d,
            USE_PDL=pdl,
            num_warps=config.num_warps,
            launch_pdl=pdl,
            enable_fp_fusion=True,  # as the rope kernel: the same fused multiply-adds, the same rounding
        )  # fmt: skip


# The launcher is the custom op that CUDA graphs and dispatch modes see: it writes q, k and the store in place.
_launch_op = torch.library.custom_op(
    "llamatelemetry::triton_rope_paged_write_", _launch, mutates_args=("q", "k", "key_cache", "value_cache")
)
_launch_op.register_fake(lambda *_: None)


@triton_errors("rope_paged_write")
def _triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    pos = token_positions(q, positions).contiguous()
    # The kernel reads one slot per token at unit stride (a no-op for the engine's contiguous mapping).
    args = (q, k, v, cos, sin, pos, key_cache, value_cache, slot_mapping.contiguous(), interleaved)
    run_op(torch.ops.llamatelemetry.triton_rope_paged_write_, _launch, *args)
    return q, k


ROPE_PAGED_WRITE = TritonOperation(
    "triton.rope_paged_write",
    _reference,
    _triton,
    describe=lambda q, k, v, cos, sin, *_: described(q, k, v, cos, sin),
    traceable=lambda q, k, v, *_: cuda_in_triton_dtypes(q, k, v),
    aliases=("rope_paged_write",),
)


def rope_paged_write_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: PagedKV) -> str | None:
    """Why :func:`triton_rope_paged_write` does not take a store (``None`` when it does): a quantized store, or
    one whose dtype is not that of ``q``, ``k`` and ``v``. No host sync; what to do instead is to rotate with
    ``triton_rope`` and store with the cache's write."""
    kv_dtype = cache.key_cache.dtype
    if cache.key_scale is not None or cache.value_scale is not None:
        return (
            f"the store is {dtype_name(kv_dtype)} with scales: a quantized store takes scales computed from the "
            "rotated keys, which the cache's own write computes"
        )
    if kv_dtype not in _STORE_DTYPES:
        return f"the store is {dtype_name(kv_dtype)}; the kernel stores float16, bfloat16 and float32"
    dtypes = {q.dtype, k.dtype, v.dtype}
    if dtypes != {kv_dtype}:
        names = ", ".join(sorted(dtype_name(d) for d in dtypes))
        return f"the store is {dtype_name(kv_dtype)} and q, k, v are {names}: the kernel stores them as they are"
    return None


def _may_share_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two ``[tokens, H, D]`` tensors may share an element: exact for unit feature strides (the slices
    of one QKV projection share storage, not elements), by storage range otherwise."""
    if a.stride(-1) == 1 and b.stride(-1) == 1:
        return footprints_may_overlap(a, b)
    return bool(a.numel() and b.numel() and torch._C._overlaps(a, b))


def _check_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    cache: PagedKV,
    slot_mapping: torch.Tensor,
) -> None:
    check_rope_args(q, k, cos, sin, positions)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"expected v to be a torch.Tensor, got {type(v).__name__}")
    if not isinstance(cache, PagedKV):
        raise TypeError(f"expected cache to be a llamatelemetry_core.kv_layout.PagedKV, got {type(cache).__name__}")
    layout = cache.validate()
    kv_shape = (q.shape[0], layout.num_kv_heads, layout.head_dim) if q.dim() == 3 else None
    if q.dim() != 3 or tuple(k.shape) != kv_shape or tuple(v.shape) != kv_shape or q.shape[-1] != layout.head_dim:
        raise ConfigurationError(
            f"expected q [tokens, H_q, {layout.head_dim}] and k, v [tokens, {layout.num_kv_heads}, "
            f"{layout.head_dim}] (the store's heads and head_dim), got q {format_shape(q.shape)}, k "
            f"{format_shape(k.shape)}, v {format_shape(v.shape)}"
        )
    refusal = rope_paged_write_refusal(q, k, v, cache)
    if refusal is not None:
        raise ConfigurationError(f"triton_rope_paged_write does not take this call: {refusal}; call triton_rope and "
                                 "then the cache's write")  # fmt: skip
    if needs_autograd(q, k, v):
        raise ConfigurationError(
            "expected q, k and v that do not require grad: storing into the cache is inference-only; run under "
            "torch.no_grad() or torch.inference_mode()"
        )
    if v.device != q.device or cache.key_cache.device != q.device:
        raise ConfigurationError(
            f"expected v and the store on {q.device} like q, got v on {v.device} and the store on "
            f"{cache.key_cache.device}"
        )
    for name, t in (("q", q), ("k", k)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ConfigurationError(
                f"expected {name} with unit feature stride (it is rotated in place through its heads), got strides "
                f"{list(t.stride())}; pass {name}.contiguous()"
            )
    for (a, ta), (b, tb) in ((("q", q), ("k", k)), (("q", q), ("v", v)), (("k", k), ("v", v))):
        if _may_share_memory(ta, tb):
            raise ConfigurationError(
                f"expected {a} and {b} in separate memory ({a} is rotated in place before {b} is read), got views "
                f"that share it; pass {b}.clone()"
            )
    slots: object = slot_mapping
    if (
        not isinstance(slots, torch.Tensor)
        or slots.dtype != torch.int64
        or tuple(slots.shape) != (q.shape[0],)
        or slots.device != q.device
    ):
        got = (
            f"{dtype_name(slots.dtype)} {format_shape(slots.shape)} on {slots.device}"
            if isinstance(slots, torch.Tensor)
            else type(slots).__name__
        )
        raise ConfigurationError(
            f"expected slot_mapping as int64 [{q.shape[0]}] on {q.device} (a slot per token, {PAD_SLOT} for "
            f"padding), got {got}"
        )
    if slot_mapping.device.type == "cpu" and slot_mapping.numel():  # on a GPU the check would synchronize
        rows = layout.num_blocks * layout.page_size
        low, high = int(slot_mapping.min()), int(slot_mapping.max())
        if low < PAD_SLOT or high >= rows:
            raise ConfigurationError(
                f"expected slots in [0, {rows}) (num_blocks * page_size) or {PAD_SLOT} (padding), got values in "
                f"[{low}, {high}]"
            )


def triton_rope_paged_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    cache: PagedKV,
    slot_mapping: torch.Tensor,
    *,
    interleaved: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` in place and store the rotated ``k`` and ``v`` in ``cache`` at ``slot_mapping``
    (see the module docstring for layouts); returns ``(q, k)``.

    ``positions`` is as for :func:`~llamatelemetry_triton.ops.rope.triton_rope` (``None``: ``arange(tokens)``).
    Slots must lie in ``[0, num_blocks * page_size)`` or be ``PAD_SLOT``; on a GPU neither slots nor positions
    are range-checked on the host (that would synchronize), on a CPU a value out of range raises. Raises
    :class:`ConfigurationError` for a store the kernel does not take (:func:`rope_paged_write_refusal`), for
    shapes that do not match the store, ``q``/``k`` without unit feature stride, views of ``q``, ``k`` and ``v``
    that share memory, and inputs that require grad. Not differentiable (inference only).
    """
    if torch.compiler.is_compiling():
        # Dynamo cannot trace the value checks nor the reference's boolean indexing: the whole call is one custom op
        # of the graph, whose body is this function run eagerly (checks, then the implementation selected then).
        _compiled_op(q, k, v, cos, sin, positions, cache.key_cache, cache.value_cache, slot_mapping,
                     bool(interleaved), backend or "")  # fmt: skip
        return q, k
    _check_args(q, k, v, cos, sin, positions, cache, slot_mapping)
    args = (q, k, v, cos, sin, positions, cache.key_cache, cache.value_cache, slot_mapping, bool(interleaved))
    return ROPE_PAGED_WRITE(*args, backend=backend)  # type: ignore[no-any-return]


@torch.library.custom_op("llamatelemetry::rope_paged_write", mutates_args=("q", "k", "key_cache", "value_cache"))
def _compiled_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    interleaved: bool,
    backend: str,
) -> None:
    """:func:`triton_rope_paged_write` as one custom op (what ``torch.compile`` records)."""
    triton_rope_paged_write(q, k, v, cos, sin, positions, PagedKV(key_cache, value_cache), slot_mapping,
                            interleaved=interleaved, backend=backend or None)  # fmt: skip


_compiled_op.register_fake(lambda *_: None)


# --- ahead-of-time builds ----------------------------------------------------------------------------------

_AOT_HEADS = (32, 8)  # query and KV heads: Llama-3 8B and Llama-3.2 1B (32 and 8) at d=128, and d=64


def aot_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """The builds :func:`triton_rope_paged_write` launches on ``device`` in ``dtype`` for 32 query and 8 KV heads,
    head dims 64 and 128, the whole head rotated (the AOT checks, :mod:`llamatelemetry_triton.aot`)."""
    t = TYPE_NAMES[dtype]
    types = dict.fromkeys(("Q", "K", "V", "KeyCache", "ValueCache"), f"*{t}")
    types.update({"Cos": "*fp32", "Sin": "*fp32", "Pos": "*i64", "SlotMapping": "*i64"})
    n_q_heads, n_kv_heads = _AOT_HEADS
    for head_dim in HEAD_DIMS:
        config = rope_config(head_dim // 2, n_q_heads, dtype, device)
        block_hv, block_d = rope_store_tile(n_kv_heads, head_dim)
        yield kernel_build(
            f"triton.rope_paged_write[{t},D={head_dim},neox]",
            _rope_paged_write_kernel,
            types,
            {
                "HEAD_DIM": head_dim,
                "INTERLEAVED": False,
                "PARTIAL": False,
                "BLOCK_H": config.chunk_size,
                "BLOCK_SIZE": config.block_size,
                "BLOCK_HV": block_hv,
                "BLOCK_D": block_d,
                "USE_PDL": pdl_capable(device),  # as programmatic_launch launches it
            },
            num_warps=config.num_warps,
        )


# --- registry entries ---------------------------------------------------------------------------------------


def _bounds(args: Mapping[str, Any], grid: tuple[int, ...]) -> None:
    tokens = grid_rows(grid)
    if tokens == 0:
        return
    kernel = "rope_paged_write"
    head_dim = int_argument(args, "HEAD_DIM", kernel)
    for name in ("Pos", "SlotMapping"):
        require_elements(args, name, tokens, kernel, f"one per token, {tokens} tokens")
    for name, heads, stride_t, stride_h in (
        ("Q", "n_q_heads", "q_stride_t", "q_stride_h"),
        ("K", "n_kv_heads", "k_stride_t", "k_stride_h"),
        ("V", "n_kv_heads", "v_stride_t", "v_stride_h"),
    ):
        h = int_argument(args, heads, kernel)
        if h:
            t, s = int_argument(args, stride_t, kernel), int_argument(args, stride_h, kernel)
            extent = (tokens - 1) * t + (h - 1) * s + head_dim
            require_elements(args, name, extent, kernel, f"{tokens} tokens x {h} heads of {head_dim}")
    half = int_argument(args, "rotary_half", kernel)
    rows = int_argument(args, "n_positions", kernel)
    for name, stride in (("Cos", "cos_stride"), ("Sin", "sin_stride")):
        if rows and half:
            extent = (rows - 1) * int_argument(args, stride, kernel) + half
            require_elements(args, name, extent, kernel, f"{rows} table rows")
    # The slots' values decide the rows stored; the stores must hold at least one row of heads.
    row = int_argument(args, "n_kv_heads", kernel) * head_dim
    for name in ("KeyCache", "ValueCache"):
        require_elements(args, name, row, kernel, "one slot of heads")


def registry_entries() -> dict[str, BuiltinEntry]:
    """This module's kernel in the registry (``get_kernel(name)``): kernel, default launch config, bounds check."""
    config = KernelConfig("rope_paged_write", 64, 4, 1, description="rotary q and k in place, k and v to a paged store")
    return {"rope_paged_write": (_rope_paged_write_kernel, config, _bounds)}
