"""Triton kernels of the fused ``matmul_tensor_core`` path: range scaling, fp16 product and unscaling in 1-2 launches.

What is computed is the specification of :mod:`llamatelemetry_tensorcore.matmul` (steps 1-4), bit for bit except
for the order of the fp32 sums inside the product:

1. :func:`largest_finite_kernel` (one launch over A and B): each program reduces a contiguous span of one input to
   its largest finite ``|x|`` and stores it, as the bits of a non-negative fp32 (ordered as integers), in a small
   buffer of partial maxima. No atomics and no zero-filled buffer: the next kernel reduces the partials. For
   small dense inputs this launch is skipped: every GEMM program reduces all of A and B itself.
2. :func:`scaled_matmul_kernel`: every program reduces the partial maxima (a few hundred integers, from L2),
   derives ``eA`` and ``eB`` with :func:`_range_exponents` (the integer form of
   :func:`~llamatelemetry_tensorcore.matmul._exponents_from_maxima`), then multiplies tiles of A and B by
   ``2^-eA`` and ``2^-eB``, rounds them to fp16 in registers, accumulates ``tl.dot`` in fp32, rounds the tile to
   fp16 and multiplies it by ``2^(eA+eB)``, stored in the output's dtype.
3. Split over K (grids too small to fill the GPU): the programs of one output tile each walk a range of K and
   store their fp32 sums, unrounded, in a workspace ``[splits, batch, M, N]``; :func:`split_sum_kernel` then adds
   them in split order (the same order every time: results are reproducible), derives the same exponents from
   the same partial maxima, rounds the sum to fp16 and unscales it into the output. Only the order of the fp32
   sums differs from one program per tile, as it already does from the reference.

Powers of two are built from their bits, never by ``exp2``. A scale beyond fp32's exponent range is applied as
two factors within it, chosen so that the first multiplication is exact and the second rounds once, which is
what the reference's float64 product rounded to the output dtype gives (PyTorch rounds float64 to fp16 or bf16
through fp32 as well).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_tensorcore.fused_matmul import (
    FusedTiles,
    SplitK,
    choose_fused_tiles,
    choose_split_k,
    fused_operands,
    largest_finite_programs,
    one_launch,
    split_chunks,
)
from llamatelemetry_tensorcore.matmul import product_thresholds

__all__ = ["fused_matmul", "largest_finite_kernel", "scaled_matmul_kernel", "split_sum_kernel"]


@triton.jit  # type: ignore[untyped-decorator]
def _block_largest_finite(x_ptr, start, numel, largest, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    """``largest`` raised elementwise to the finite ``|x|`` of ``x[start:start + BLOCK]`` (within ``numel``)."""
    index = start + tl.arange(0, BLOCK)
    magnitude = tl.abs(tl.load(x_ptr + index, mask=index < numel, other=0.0).to(tl.float32))
    # NaN fails the comparison as well as inf does: neither counts
    return tl.maximum(largest, tl.where(magnitude < float("inf"), magnitude, 0.0))


@triton.jit  # type: ignore[untyped-decorator]
def largest_finite_kernel(  # type: ignore[no-untyped-def]
    a_ptr,
    b_ptr,
    partial_ptr,
    a_numel,
    b_numel,
    a_span,
    b_span,
    programs_a,
    BLOCK: tl.constexpr,
    PIPELINED: tl.constexpr,
):
    pid = tl.program_id(0)
    largest = tl.zeros([BLOCK], dtype=tl.float32)
    # Triton's interpreter cannot take range() over a scalar argument (NumPy 2 refuses int() of its 1-element
    # arrays): it loops with while, compiled code with range, which Triton pipelines.
    if pid < programs_a:
        if PIPELINED:
            for offset in range(0, a_span, BLOCK):
                largest = _block_largest_finite(a_ptr, pid * a_span + offset, a_numel, largest, BLOCK)
        else:
            offset = 0
            while offset < a_span:
                largest = _block_largest_finite(a_ptr, pid * a_span + offset, a_numel, largest, BLOCK)
                offset += BLOCK
    else:
        start = (pid - programs_a) * b_span
        if PIPELINED:
            for offset in range(0, b_span, BLOCK):
                largest = _block_largest_finite(b_ptr, start + offset, b_numel, largest, BLOCK)
        else:
            offset = 0
            while offset < b_span:
                largest = _block_largest_finite(b_ptr, start + offset, b_numel, largest, BLOCK)
                offset += BLOCK
    tl.store(partial_ptr + pid, tl.max(largest, axis=0).to(tl.int32, bitcast=True))


@triton.jit  # type: ignore[untyped-decorator]
def _normalize_step(m, x, SHIFT: tl.constexpr):  # type: ignore[no-untyped-def]
    small = m < (1 << (24 - SHIFT))
    return tl.where(small, m << SHIFT, m), tl.where(small, x - SHIFT, x)


@triton.jit
def _frexp_bits(bits):  # type: ignore[no-untyped-def]
    """``(m, x)`` with ``value = m 2^(x - 24)`` and ``m`` in [2^23, 2^24), for the bits of a positive finite fp32
    (frexp with a 24-bit integer mantissa; subnormals normalized by shifts, so no float arithmetic is involved)."""
    biased = (bits >> 23) & 0xFF
    fraction = bits & 0x7FFFFF
    m = tl.where(biased > 0, fraction | 0x800000, fraction)
    x = tl.maximum(biased, 1) - 126
    m, x = _normalize_step(m, x, 16)
    m, x = _normalize_step(m, x, 8)
    m, x = _normalize_step(m, x, 4)
    m, x = _normalize_step(m, x, 2)
    return _normalize_step(m, x, 1)


@triton.jit
def _range_exponents(bits_a, bits_b, k_bits, half, quarter, eighth):  # type: ignore[no-untyped-def]
    """``(eA, eB)`` (int32) of step 1 from the bits of ``max|A|`` and ``max|B|`` (non-negative fp32) and K's
    :func:`~llamatelemetry_tensorcore.matmul.product_thresholds`, as ``_exponents_from_maxima`` computes them."""
    m_a, x_a = _frexp_bits(bits_a)
    m_b, x_b = _frexp_bits(bits_b)
    e0_a = tl.where(bits_a > 0, tl.maximum(x_a - (m_a == 0x800000).to(tl.int32) - 15, -960), 0)
    e0_b = tl.where(bits_b > 0, tl.maximum(x_b - (m_b == 0x800000).to(tl.int32) - 15, -960), 0)
    product = m_a.to(tl.int64) * m_b.to(tl.int64)
    above = (product > half).to(tl.int32) + (product > quarter).to(tl.int32) + (product > eighth).to(tl.int32)
    excess = x_a + x_b + k_bits - 3 - 15 + above - e0_a - e0_b
    p = tl.where((bits_a > 0) & (bits_b > 0), tl.maximum(excess, 0), 0)
    return e0_a + ((p + 1) >> 1), e0_b + (p >> 1)


@triton.jit
def _power_of_two(e):  # type: ignore[no-untyped-def]
    """``2^e`` in fp32 from its bits, for an integer ``e`` in [-126, 127]."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _scaled_to_fp16(x, first, second):  # type: ignore[no-untyped-def]
    """``round_fp16(x 2^e)`` for ``2^e = first * second`` (same signs of exponent): scaling up never rounds, and
    scaling down rounds at most once above fp16's zero threshold."""
    return (x.to(tl.float32) * first * second).to(tl.float16)


@triton.jit
def _scaled_dot(  # type: ignore[no-untyped-def]
    acc, a_tile, b_tile, rows, cols, inner, k_left, M, N, a_first, a_second, b_first, b_second
):
    """``acc`` plus the product of one K step: tiles of A and B loaded (zeros beyond the edges), scaled and
    rounded to fp16, multiplied on Tensor Cores with fp32 accumulation."""
    a = tl.load(a_tile, mask=(rows[:, None] < M) & (inner[None, :] < k_left), other=0.0)
    b = tl.load(b_tile, mask=(inner[:, None] < k_left) & (cols[None, :] < N), other=0.0)
    return tl.dot(_scaled_to_fp16(a, a_first, a_second), _scaled_to_fp16(b, b_first, b_second), acc)


@triton.jit  # type: ignore[untyped-decorator]
def _partial_exponents(partial_ptr, programs_a, programs_b, k_bits, half, quarter, eighth, PARTIALS: tl.constexpr):  # type: ignore[no-untyped-def]
    """``(eA, eB)`` from the partial maxima of the reduction launch (``programs_a`` of A, then ``programs_b`` of B)."""
    partials = tl.arange(0, PARTIALS)
    bits_a = tl.max(tl.load(partial_ptr + partials, mask=partials < programs_a, other=0), axis=0)
    bits_b = tl.max(tl.load(partial_ptr + programs_a + partials, mask=partials < programs_b, other=0), axis=0)
    return _range_exponents(bits_a, bits_b, k_bits, half, quarter, eighth)


@triton.jit
def _unscaled(total, e_a, e_b):  # type: ignore[no-untyped-def]
    """Steps 3-4 on a tile's fp32 sums: rounded to fp16, then multiplied by ``2^(eA+eB)`` (in fp32)."""
    # 2^(eA+eB) as two fp32 factors after a clamp to [-170, 170], beyond which every fp16 value times the power
    # is 0 or inf in fp32 anyway.
    e_c = tl.minimum(tl.maximum(e_a + e_b, -170), 170)
    return total.to(tl.float16).to(tl.float32) * _power_of_two(e_c >> 1) * _power_of_two(e_c - (e_c >> 1))


@triton.jit  # type: ignore[untyped-decorator]
def scaled_matmul_kernel(  # type: ignore[no-untyped-def]
    a_ptr,
    b_ptr,
    c_ptr,
    partial_ptr,
    M,
    N,
    K,
    stride_ab,
    stride_am,
    stride_ak,
    stride_bb,
    stride_bk,
    stride_bn,
    stride_cb,
    stride_cm,
    stride_cn,
    workspace_ptr,
    k_chunk,
    programs_a,
    programs_b,
    k_bits,
    half,
    quarter,
    eighth,
    a_numel,
    b_numel,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    REDUCE_BLOCK: tl.constexpr,  # partial maxima read per input, or (ONE_LAUNCH) elements reduced per step
    ONE_LAUNCH: tl.constexpr,
    SPLIT_K: tl.constexpr,  # program_id(2) walks K[split * k_chunk:][:k_chunk], stores fp32 sums in the workspace
    PIPELINED: tl.constexpr,
):
    if ONE_LAUNCH:
        # Small dense inputs: every program reduces all of A and B itself (from L2) instead of reading the
        # partials of a reduction launch, which saves that launch. A's and B's pointers are their storage.
        largest_a = tl.zeros([REDUCE_BLOCK], dtype=tl.float32)
        largest_b = tl.zeros([REDUCE_BLOCK], dtype=tl.float32)
        if PIPELINED:
            for offset in range(0, a_numel, REDUCE_BLOCK):
                largest_a = _block_largest_finite(a_ptr, offset, a_numel, largest_a, REDUCE_BLOCK)
            for offset in range(0, b_numel, REDUCE_BLOCK):
                largest_b = _block_largest_finite(b_ptr, offset, b_numel, largest_b, REDUCE_BLOCK)
        else:
            offset = 0
            while offset < a_numel:
                largest_a = _block_largest_finite(a_ptr, offset, a_numel, largest_a, REDUCE_BLOCK)
                offset += REDUCE_BLOCK
            offset = 0
            while offset < b_numel:
                largest_b = _block_largest_finite(b_ptr, offset, b_numel, largest_b, REDUCE_BLOCK)
                offset += REDUCE_BLOCK
        bits_a = tl.max(largest_a, axis=0).to(tl.int32, bitcast=True)
        bits_b = tl.max(largest_b, axis=0).to(tl.int32, bitcast=True)
        e_a, e_b = _range_exponents(bits_a, bits_b, k_bits, half, quarter, eighth)
    else:
        e_a, e_b = _partial_exponents(partial_ptr, programs_a, programs_b, k_bits, half, quarter, eighth, REDUCE_BLOCK)
    # 2^-eA and 2^-eB as two fp32 factors each (|eA| reaches 164 for fp32 inputs)
    a_first = _power_of_two((-e_a) >> 1)
    a_second = _power_of_two(-e_a - ((-e_a) >> 1))
    b_first = _power_of_two((-e_b) >> 1)
    b_second = _power_of_two(-e_b - ((-e_b) >> 1))

    # grouped order of the output tiles: GROUP_M rows of tiles share the columns of B they read from L2
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SPLIT_K:
        k_start = tl.program_id(2) * k_chunk
        k_end = tl.minimum(K, k_start + k_chunk)
    else:
        k_start = 0
        k_end = K
    inner = k_start + tl.arange(0, BLOCK_K)
    a_tile = a_ptr + batch * stride_ab + rows[:, None] * stride_am + inner[None, :] * stride_ak
    b_tile = b_ptr + batch * stride_bb + inner[:, None] * stride_bk + cols[None, :] * stride_bn
    inner = tl.arange(0, BLOCK_K)  # from here on, within the step (masked against what is left of the range)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if PIPELINED:
        for k0 in range(k_start, k_end, BLOCK_K):
            acc = _scaled_dot(
                acc, a_tile, b_tile, rows, cols, inner, k_end - k0, M, N, a_first, a_second, b_first, b_second
            )
            a_tile += BLOCK_K * stride_ak
            b_tile += BLOCK_K * stride_bk
    else:
        k0 = k_start
        while k0 < k_end:
            acc = _scaled_dot(
                acc, a_tile, b_tile, rows, cols, inner, k_end - k0, M, N, a_first, a_second, b_first, b_second
            )
            a_tile += BLOCK_K * stride_ak
            b_tile += BLOCK_K * stride_bk
            k0 += BLOCK_K
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    if SPLIT_K:
        # [splits, batch, M, N], dense: the split-sum launch reads it back (fewer than 2^26 elements: int32)
        sums = workspace_ptr + ((tl.program_id(2) * tl.num_programs(1) + batch) * M + rows[:, None]) * N
        tl.store(sums + cols[None, :], acc, mask=inside)
    else:
        c_tile = c_ptr + batch * stride_cb + rows[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_tile, _unscaled(acc, e_a, e_b).to(c_ptr.dtype.element_ty), mask=inside)


@triton.jit  # type: ignore[untyped-decorator]
def split_sum_kernel(  # type: ignore[no-untyped-def]
    workspace_ptr,
    c_ptr,
    partial_ptr,
    M,
    N,
    splits,
    stride_cb,
    stride_cm,
    stride_cn,
    programs_a,
    programs_b,
    k_bits,
    half,
    quarter,
    eighth,
    BLOCK: tl.constexpr,
    PARTIALS: tl.constexpr,
    PIPELINED: tl.constexpr,
):
    """``C[batch]`` (program_id(1)) from the workspace ``[splits, batch, M, N]`` of fp32 sums: added in split
    order, rounded to fp16 and unscaled, ``BLOCK`` elements of ``M x N`` per program."""
    batch = tl.program_id(1)
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = index < M * N
    sums = workspace_ptr + batch * M * N + index
    step = tl.num_programs(1) * M * N
    total = tl.zeros([BLOCK], dtype=tl.float32)
    if PIPELINED:
        for split in range(splits):
            total += tl.load(sums + split * step, mask=inside, other=0.0)
    else:
        split = 0
        while split < splits:
            total += tl.load(sums + split * step, mask=inside, other=0.0)
            split += 1
    e_a, e_b = _partial_exponents(partial_ptr, programs_a, programs_b, k_bits, half, quarter, eighth, PARTIALS)
    row, col = index // N, index % N
    c = c_ptr + batch * stride_cb + row * stride_cm + col * stride_cn
    tl.store(c, _unscaled(total, e_a, e_b).to(c_ptr.dtype.element_ty), mask=inside)


_MAX_OFFSET = 2**31 - 1  # the largest element offset an int32 index reaches


def _span(x: torch.Tensor) -> int:
    """The largest element offset from ``x``'s data pointer that its elements reach."""
    return sum((size - 1) * abs(stride) for size, stride in zip(x.shape, x.stride(), strict=True) if size > 0)


def _shares_storage(out: torch.Tensor, *inputs: torch.Tensor) -> bool:
    storage = out.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == storage for t in inputs)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``x``'s elements in memory order as one dense span: ``x`` itself when it is contiguous or a transposed
    contiguous tensor (``W.mT``), else a contiguous copy (the largest value does not depend on the order)."""
    if x.is_contiguous() or x.mT.is_contiguous():
        return x
    return x.contiguous()


def fused_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor | None,
    *,
    launches: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """``matmul_tensor_core(a, b, out, dtype=torch.float16)`` for a call the fused path supports (see
    :func:`~llamatelemetry_tensorcore.fused_matmul.fused_scope_reason`), with no host sync.

    Launches: the reduction of A and B to their largest values (skipped for small dense inputs), then the GEMM,
    or, for a grid of output tiles too small to fill the GPU, the GEMM split over K and the sum of its splits.

    ``launches`` and ``splits`` are for tests and measurements. ``launches``: ``None`` chooses one launch for
    small dense inputs (:func:`~llamatelemetry_tensorcore.fused_matmul.one_launch`) and two otherwise; ``1`` or
    ``2`` force it (the same numbers, bit for bit). ``splits``: ``None`` splits K as
    :func:`~llamatelemetry_tensorcore.fused_matmul.split_k` chooses (never in one launch); ``1`` never; more
    splits K into at most that many ranges of whole tile steps (the same numbers but for the order of fp32
    sums). Raises :class:`ConfigurationError` for ``launches=1`` when A or B is not dense in memory, and for
    ``launches=1`` with ``splits`` above 1 or ``splits`` below 1.
    """
    a, b = a.detach(), b.detach()
    # The kernels index with int32: a strided view spanning more of its storage than that is read from a copy.
    a = a if _span(a) <= _MAX_OFFSET else a.contiguous()
    b = b if _span(b) <= _MAX_OFFSET else b.contiguous()
    operands = fused_operands(a, b)
    tiles: FusedTiles = choose_fused_tiles(operands.m, operands.n, operands.batch, a.device)
    shape = operands.result_shape
    # Programs write their tiles while others still read A and B: an `out` sharing storage with either (or too
    # widely strided for int32 offsets) gets the result copied in at the end instead.
    direct = out is not None and _span(out) <= _MAX_OFFSET and not _shares_storage(out, a, b)
    c = out if direct else torch.empty(shape, dtype=a.dtype, device=a.device)
    assert c is not None
    c3 = operands.view_result(c)
    target = c3 if c3 is not None else torch.empty(operands.batched_shape, dtype=a.dtype, device=a.device)
    a3, b3 = operands.a3, operands.b3

    interpreted = triton_interpreter_enabled()
    flat_a, flat_b = _flat(a), _flat(b)
    # one launch reads A and B through a3 and b3's base pointers: only when those are their dense storage
    dense = flat_a is a and flat_b is b and a3.data_ptr() == a.data_ptr() and b3.data_ptr() == b.data_ptr()
    if launches == 1 and not dense:
        raise ConfigurationError(
            "expected A and B dense in memory (contiguous, or transposed contiguous) for one launch, got strides "
            f"{tuple(a.stride())} and {tuple(b.stride())}; pass launches=None or 2"
        )
    if splits is not None and (splits < 1 or (splits > 1 and launches == 1)):
        raise ConfigurationError(
            f"expected splits >= 1, and 1 (or None) with launches=1 (one launch never splits K), got splits={splits} "
            f"with launches={launches}"
        )
    tiles_mn = triton.cdiv(operands.m, tiles.block_m) * triton.cdiv(operands.n, tiles.block_n)
    automatic = one_launch(a.numel(), b.numel(), tiles_mn * operands.batch)
    # splits above 1 ask for the split GEMM, which reads the reduction launch's partial maxima: two launches
    single = dense and (automatic and (splits or 1) == 1 if launches is None else launches == 1)
    if single:
        split = SplitK(1, operands.k)
    elif splits is None:
        split = choose_split_k(operands.m, operands.n, operands.k, operands.batch, tiles, a.device)
    else:
        split = split_chunks(operands.k, splits, tiles.block_k, math.prod(operands.batched_shape))
    if single:
        programs_a = programs_b = 0
        partial = torch.empty(1, dtype=torch.int32, device=a.device)
        reduce_block = tiles.one_launch_block
    else:
        programs_a, span_a = largest_finite_programs(flat_a.numel(), tiles)
        programs_b, span_b = largest_finite_programs(flat_b.numel(), tiles)
        partial = torch.empty(programs_a + programs_b, dtype=torch.int32, device=a.device)
        reduce_block = tiles.partials
        largest_finite_kernel[(programs_a + programs_b,)](
            flat_a,
            flat_b,
            partial,
            flat_a.numel(),
            flat_b.numel(),
            span_a,
            span_b,
            programs_a,
            BLOCK=tiles.reduce_block,
            PIPELINED=not interpreted,
            num_warps=tiles.reduce_warps,
            enable_fp_fusion=True,  # the default up to Triton 3.9; 3.10 turns it off
        )
    k_bits, half, quarter, eighth = product_thresholds(operands.k)
    workspace = target
    if split.splits > 1:
        workspace = torch.empty((split.splits, *operands.batched_shape), dtype=torch.float32, device=a.device)
    scaled_matmul_kernel[(tiles_mn, operands.batch, split.splits)](
        a3,
        b3,
        target,
        partial,
        operands.m,
        operands.n,
        operands.k,
        a3.stride(0),
        a3.stride(1),
        a3.stride(2),
        b3.stride(0),
        b3.stride(1),
        b3.stride(2),
        target.stride(0),
        target.stride(1),
        target.stride(2),
        workspace,
        split.chunk,
        programs_a,
        programs_b,
        k_bits,
        half,
        quarter,
        eighth,
        a.numel(),
        b.numel(),
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        GROUP_M=tiles.group_m,
        REDUCE_BLOCK=reduce_block,
        ONE_LAUNCH=single,
        SPLIT_K=split.splits > 1,
        PIPELINED=not interpreted,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        enable_fp_fusion=True,
    )
    if split.splits > 1:
        mn = operands.m * operands.n
        split_sum_kernel[(triton.cdiv(mn, tiles.split_sum_block), operands.batch)](
            workspace,
            target,
            partial,
            operands.m,
            operands.n,
            split.splits,
            target.stride(0),
            target.stride(1),
            target.stride(2),
            programs_a,
            programs_b,
            k_bits,
            half,
            quarter,
            eighth,
            BLOCK=tiles.split_sum_block,
            PARTIALS=tiles.partials,
            PIPELINED=not interpreted,
            num_warps=tiles.split_sum_warps,
            enable_fp_fusion=True,
        )
    if c3 is None:
        c.copy_(target.reshape(shape))
    if out is not None and c is not out:
        return out.copy_(c)
    return c
