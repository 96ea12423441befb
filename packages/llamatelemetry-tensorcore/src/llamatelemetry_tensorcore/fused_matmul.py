"""The ``fused`` implementation of ``matmul_tensor_core``: the whole specification in one to three Triton launches.

The ``tensor_core`` path range-scales in separate passes (largest values, exponents, scaled copies of A and B in
fp16, cuBLAS, unscaling): about 34 kernel launches per fp32 call, a fixed cost that dominates small products
(1024^3 from fp32 ran at 0.11x of a plain fp32 matmul on an H200). This path computes the same specification
(:mod:`llamatelemetry_tensorcore.matmul`, steps 1-4) in two launches (:mod:`~llamatelemetry_tensorcore._fused_kernels`):
one reduction of A and B to their largest finite magnitudes, then one GEMM that derives the exponents, scales
and rounds its tiles to fp16 in registers, multiplies them on Tensor Cores with fp32 accumulation, rounds the
tile to fp16 and unscales it into the output. Small dense inputs take one launch: each GEMM program reduces A
and B itself. A grid of output tiles too small to fill the GPU (few rows) splits K over several programs per
tile, and a third launch adds their fp32 partial sums, rounds and unscales. Results equal the reference's except
for the order of the fp32 sums (within the error bound the tests hold cuBLAS to).

Scope (checks refuse anything else with a reason, and the ``tensor_core`` path runs): ``dtype=torch.float16``
with an input that is not fp16 (fp32, bf16; fp16 with the other one of those); no float64; B of 2 dimensions
(A's leading dimensions fold into M) or A and B of at most 3 with one batch dimension (at most 65535 batches);
no empty product; at most 2^30 elements per tensor; CUDA compute capability >= 7.5 with Triton installed (or
Triton's interpreter on a CPU, without bf16, which NumPy cannot round); and a product small enough,
:data:`FUSED_MATMUL_MAX_MNK` (:data:`FUSED_INTERPRETED_MAX_MNK` in the interpreter).

Launch heuristics (pure functions of the shape and the device, shared by the launcher and the ahead-of-time
builds): :func:`fused_tiles`, :func:`largest_finite_programs`, :func:`one_launch` (small dense inputs skip the
reduction launch: each GEMM program reduces A and B itself) and :func:`split_k` (a grid of output tiles too small
to fill the GPU, a decode-shaped ``1 x 4096 x 4096`` product, splits K over several programs per tile, which
store fp32 partial sums; a third launch adds them in a fixed order, rounds to fp16 and unscales).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.environment import triton_devices
from llamatelemetry_core.interpreter import triton_launch_guard
from llamatelemetry_core.selection import CallSpec, QuietReason, gate, requires_min_capability, requires_module
from llamatelemetry_core.toolchain import TRITON_INSTALL
from llamatelemetry_tensorcore.matmul import MATMUL_OPERATION, MatmulCall

if TYPE_CHECKING:
    from llamatelemetry_core.aot import KernelBuild

__all__ = [
    "FUSED",
    "FUSED_INTERPRETED_MAX_MNK",
    "FUSED_MATMUL_MAX_MNK",
    "FUSED_ONE_LAUNCH_MAX_ELEMENTS",
    "FUSED_ONE_LAUNCH_MAX_PROGRAMS",
    "SPLIT_K_MAX_SPLITS",
    "SPLIT_K_MIN_CHUNK",
    "SPLIT_K_PROGRAMS_PER_SM",
    "FusedOperands",
    "FusedTiles",
    "SplitK",
    "choose_fused_tiles",
    "choose_split_k",
    "fused_operands",
    "fused_scope_reason",
    "fused_tiles",
    "kernel_builds",
    "largest_finite_programs",
    "one_launch",
    "split_chunks",
    "split_k",
]

FUSED = "fused"

FUSED_MATMUL_MAX_MNK = 2048 * 4096 * 11008
"""Largest ``batch * M * N * K`` the fused path is chosen for (about 2^36.4); larger products take ``tensor_core``
(cuBLAS).

Below it the fused path wins by skipping the range-scaling passes and their launches; above it cuBLAS's fp16
GEMM, faster than this Triton GEMM on fp32 tiles, pays for them. Measured on an H200 with
``python benchmarks/tensorcore/check_fused_matmul.py`` (``benchmarks/results/nvidia-h200/tensorcore-fused``):
the fused path was within 2% of cuBLAS's or faster at every measured product up to ``2048 x 4096 x 11008``
(4.12x fp32 there, against 3.46x for cuBLAS), and slower at the next, 6144^3.
"""

FUSED_INTERPRETED_MAX_MNK = 2**18
"""The same bound under Triton's interpreter (CPU tensors, ``TRITON_INTERPRET=1``): a vehicle for testing the kernels,
never faster than the reference, so only small products take it there."""

FUSED_ONE_LAUNCH_MAX_ELEMENTS = 2**15
"""Largest ``A.numel() + B.numel()`` (dense inputs) for which the reduction launch is skipped and every GEMM program
reduces all of A and B itself. One SM reads about 100-200 GB/s from L2, so 128 KiB of fp32 per program takes
about a microsecond, less than a launch; beyond that the reduction launch, spread over the GPU, is cheaper.
An estimate: ``check_fused_matmul.py`` times the sizes around it.

One launch also needs a small grid (:data:`FUSED_ONE_LAUNCH_MAX_PROGRAMS`): every program re-reads A and B, so
an outer product of two long vectors, small inputs but thousands of output tiles, takes two launches."""

FUSED_ONE_LAUNCH_MAX_PROGRAMS = 64
"""Most GEMM programs a one-launch product may have (see :data:`FUSED_ONE_LAUNCH_MAX_ELEMENTS`)."""

SPLIT_K_PROGRAMS_PER_SM = 2
"""Split K while a product has fewer GEMM programs than this many per SM, up to about as many (see
:func:`split_k`): one program per SM leaves too few loads in flight to stream a long B at the memory's speed.
An estimate, like :data:`SPLIT_K_MIN_CHUNK`: ``check_fused_matmul.py --split-k`` times K forced into 1 to 32
ranges beside the choice."""

SPLIT_K_MIN_CHUNK = 256
"""Fewest elements of K one split walks (8 steps of a 32-deep tile): shorter walks spend more on the pipeline's
fill, the partial sums' round trip and the third launch than they save. An estimate; ``check_fused_matmul.py``
times split and unsplit launches side by side."""

SPLIT_K_MAX_SPLITS = 64
"""Most splits of K per output tile."""

_SPLIT_WORKSPACE_MAX_ELEMENTS = 2**26  # fp32 partial sums (256 MiB): far below int32 offsets, and bounded memory
_MAX_ELEMENTS = 2**30  # int32 offsets in the kernels, with room for a block past the last element
_MAX_BATCH = 65535  # the grid's second dimension
_PARTIALS = 256  # partial maxima per input: programs of the reduction launch, reduced again by each GEMM program
_REDUCE_BLOCK = 4096
_INTERPRETED_REDUCE_BLOCK = 1024


@dataclass(frozen=True)
class FusedTiles:
    """How the two kernels are launched: the GEMM's tiles, warps and stages; the reduction's block and warps."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    reduce_block: int
    reduce_warps: int
    partials: int = _PARTIALS
    one_launch_block: int = 1024  # elements per step of a GEMM program's own reduction (one launch)
    split_sum_block: int = 1024  # output elements per program of the split-sum launch (split K)
    split_sum_warps: int = 4


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def fused_tiles(m: int, n: int, batch: int, info: DeviceInfo) -> FusedTiles:
    """The launch configuration for a ``[batch, m, K] @ [batch, K, n]`` product on ``info``.

    Tiles of 128 x 128 on Ampere and newer (fp32 tiles of 128 x 32 for A and B: 32 KiB per pipeline stage,
    three stages), 64 x 64 with two stages on a T4 (64 KiB of shared memory per block); 8 warps from 64 x 128
    (64 x 64 on a T4), where 4 would need more than 255 registers per thread; M's tile shrinks to the
    smallest power of two >= 16 holding M (``tl.dot`` needs 16), and N's halves, down to 32, while there are
    fewer tiles than SMs (a decode-shaped ``1 x 4096 x 4096`` product). The Triton interpreter (a CPU) gets
    few, small programs.
    """
    if not info.is_cuda:
        return FusedTiles(
            block_m=min(32, max(16, _pow2_at_least(m))),
            block_n=min(32, max(16, _pow2_at_least(n))),
            block_k=16,
            group_m=4,
            num_warps=4,
            num_stages=1,
            reduce_block=_INTERPRETED_REDUCE_BLOCK,
            reduce_warps=4,
        )
    ampere = info.capability_at_least(8, 0)
    block_m = min(128 if ampere else 64, max(16, _pow2_at_least(m)))
    block_n = 128 if ampere else 64
    while block_n > 32 and batch * math.ceil(m / block_m) * math.ceil(n / block_n) < info.sm_count:
        block_n //= 2
    return FusedTiles(
        block_m=block_m,
        block_n=block_n,
        block_k=32,
        group_m=8,
        # Turing's mma needs more registers per output: 64 x 64 on 4 warps spills there, on 8 it does not
        num_warps=8 if block_m * block_n >= (8192 if ampere else 4096) else 4,
        num_stages=3 if ampere else 2,
        reduce_block=_REDUCE_BLOCK,
        reduce_warps=8,
    )


def one_launch(a_numel: int, b_numel: int, programs: int = 1) -> bool:
    """Whether inputs of these sizes, multiplied by ``programs`` GEMM programs, are small enough for one launch
    (see :data:`FUSED_ONE_LAUNCH_MAX_ELEMENTS` and :data:`FUSED_ONE_LAUNCH_MAX_PROGRAMS`)."""
    return a_numel + b_numel <= FUSED_ONE_LAUNCH_MAX_ELEMENTS and programs <= FUSED_ONE_LAUNCH_MAX_PROGRAMS


def largest_finite_programs(numel: int, tiles: FusedTiles) -> tuple[int, int]:
    """``(programs, span)`` of the reduction for an input of ``numel`` elements: at most ``tiles.partials``
    programs, each reducing ``span`` consecutive elements (a multiple of the block)."""
    blocks = max(1, math.ceil(numel / tiles.reduce_block))
    programs = min(blocks, tiles.partials)
    span = math.ceil(blocks / programs) * tiles.reduce_block
    return max(1, math.ceil(numel / span)), span


@dataclass(frozen=True)
class SplitK:
    """How K is divided among the programs of one output tile: ``splits`` consecutive ranges of ``chunk`` elements
    (a multiple of the tile's depth; the last range takes the rest, never nothing). ``splits == 1``: one program
    per tile walks all of K (``chunk == K``) and stores the finished tile itself."""

    splits: int
    chunk: int


def split_chunks(k: int, splits: int, block_k: int, outputs: int = 1) -> SplitK:
    """K divided into at most ``splits`` ranges of whole ``block_k`` steps, none empty: fewer when K is short or
    when ``splits`` partial sums of ``outputs`` elements (``batch * M * N``) would pass 2^26 fp32 elements."""
    splits = min(splits, _SPLIT_WORKSPACE_MAX_ELEMENTS // outputs)
    if splits <= 1 or k <= block_k:
        return SplitK(1, k)
    chunk = math.ceil(math.ceil(k / splits) / block_k) * block_k
    count = math.ceil(k / chunk)
    return SplitK(count, chunk) if count > 1 else SplitK(1, k)


def split_k(m: int, n: int, k: int, batch: int, tiles: FusedTiles, info: DeviceInfo) -> SplitK:
    """How to split K for a ``[batch, m, k] @ [batch, k, n]`` product launched with ``tiles`` on ``info``.

    A GPU whose grid of output tiles has fewer than :data:`SPLIT_K_PROGRAMS_PER_SM` programs per SM (``1 x 4096
    x 4096`` on an H100: 128 tiles of 16 x 32 for 132 SMs) gets that many programs in all by splitting K, as
    long as every split walks at least :data:`SPLIT_K_MIN_CHUNK` elements of K, there are at most
    :data:`SPLIT_K_MAX_SPLITS`, and the fp32 partial sums (``splits * batch * m * n``) stay within 2^26
    elements. The Triton interpreter (a CPU) never splits unless told to: it has no SMs to fill.
    """
    if not info.is_cuda:
        return SplitK(1, k)
    programs = batch * math.ceil(m / tiles.block_m) * math.ceil(n / tiles.block_n)
    wanted = SPLIT_K_PROGRAMS_PER_SM * info.sm_count
    if programs >= wanted:
        return SplitK(1, k)
    splits = min(math.ceil(wanted / programs), k // SPLIT_K_MIN_CHUNK, SPLIT_K_MAX_SPLITS)
    return split_chunks(k, splits, tiles.block_k, batch * m * n)


@dataclass(frozen=True)
class FusedOperands:
    """A and B as the GEMM kernel reads them, ``[batch, M, K]`` and ``[batch, K, N]`` (a broadcast batch has
    stride 0), and the result's shapes: the caller's and the kernel's ``[batch, M, N]``."""

    a3: torch.Tensor
    b3: torch.Tensor
    result_shape: tuple[int, ...]

    @property
    def batch(self) -> int:
        return int(self.a3.shape[0])

    @property
    def m(self) -> int:
        return int(self.a3.shape[1])

    @property
    def k(self) -> int:
        return int(self.a3.shape[2])

    @property
    def n(self) -> int:
        return int(self.b3.shape[2])

    @property
    def batched_shape(self) -> tuple[int, int, int]:
        return (self.batch, self.m, self.n)

    def view_result(self, c: torch.Tensor) -> torch.Tensor | None:
        """``c`` (of ``result_shape``) viewed as ``[batch, M, N]``; ``None`` when its strides do not allow it."""
        try:
            return c.view(self.batched_shape)
        except RuntimeError:
            return None


def _fused_result_shape(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(b_shape) == 2:
        return (*a_shape[:-1], b_shape[-1])
    batch = max(a_shape[0] if len(a_shape) == 3 else 1, b_shape[0])
    return (batch, a_shape[-2], b_shape[-1])


def fused_operands(a: torch.Tensor, b: torch.Tensor) -> FusedOperands:
    """A and B of a call :func:`fused_scope_reason` accepts, as the kernel reads them (views where possible)."""
    a, b = a.detach(), b.detach()
    shape = _fused_result_shape(tuple(a.shape), tuple(b.shape))
    if b.dim() == 2:
        return FusedOperands(a.reshape(1, -1, a.shape[-1]), b.unsqueeze(0), shape)
    a3 = a if a.dim() == 3 else a.unsqueeze(0)
    return FusedOperands(a3.expand(shape[0], -1, -1), b.expand(shape[0], -1, -1), shape)


def _shape_reason(a_shape: tuple[int, ...], b_shape: tuple[int, ...], limit: int) -> str | None:
    if len(b_shape) > 3 or (len(b_shape) == 3 and len(a_shape) > 3):
        return "multiplies B of 2 dimensions, or A and B of at most 3 (one batch dimension)"
    result = _fused_result_shape(a_shape, b_shape)
    k = a_shape[-1]
    if k == 0 or 0 in result:
        return "an empty product has nothing to fuse"
    if max(math.prod(a_shape), math.prod(b_shape), math.prod(result)) > _MAX_ELEMENTS:
        return "indexes at most 2^30 elements per tensor"
    if len(result) == 3 and len(b_shape) == 3 and result[0] > _MAX_BATCH:
        return f"runs at most {_MAX_BATCH} batches in one launch"
    if math.prod(result) * k > limit:
        where = "cuBLAS is faster above" if limit == FUSED_MATMUL_MAX_MNK else "the interpreter is slower above"
        return f"chosen for products of batch*M*N*K <= {limit} (2^{math.log2(limit):.1f}); {where}"
    return None


def fused_scope_reason(call: CallSpec) -> str | None:
    """Why the fused path does not take ``call`` (``None``: it does); see the module docstring."""
    if call.dtype != torch.float16:
        return "range-scales for dtype=torch.float16 only (bfloat16 needs no scaling)"
    # Every call of matmul_tensor_core carries its input dtypes; a call without them is the generic question
    # `llamatelemetry doctor` asks of a device, answered for the inputs this path exists for (float32).
    facts = call.facts_as(MatmulCall) or MatmulCall(torch.float32, torch.float32)
    dtypes = (facts.a_dtype, facts.b_dtype)
    if dtypes == (torch.float16, torch.float16):
        return "float16 inputs need no range scaling"
    if torch.float64 in dtypes:
        return "takes float32, bfloat16 and float16 inputs, not float64"
    if torch.bfloat16 in dtypes and not call.device.is_cuda:
        return QuietReason("the Triton interpreter cannot round to bfloat16 (NumPy has none)")
    if torch.bfloat16 in dtypes and not call.device.supports_bf16:
        return f"reads bfloat16 inputs on GPUs with bfloat16 (compute capability >= 8.0), not on {call.device.name}"
    if len(call.shapes) >= 2:
        limit = FUSED_MATMUL_MAX_MNK if call.device.is_cuda else FUSED_INTERPRETED_MAX_MNK
        return _shape_reason(call.shapes[0], call.shapes[1], limit)
    return None


def _fused(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    from llamatelemetry_tensorcore._fused_kernels import fused_matmul

    del dtype  # float16: the scope check sees to it
    with triton_launch_guard(a.device):  # the interpreter runs one launch at a time
        return fused_matmul(a, b, out)


@torch.library.custom_op("llamatelemetry::tensorcore_fused_matmul", mutates_args=())
def _fused_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The fused path as one graph node for ``torch.compile`` (the result in a new tensor)."""
    return _fused(a, b, None, torch.float16)


@_fused_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(_fused_result_shape(tuple(a.shape), tuple(b.shape)))


def _fused_traced(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``_fused`` as ``torch.compile`` traces it: the custom op, then a copy into ``out`` when given."""
    del dtype
    result: torch.Tensor = _fused_op(a, b)
    return result if out is None else out.copy_(result)


MATMUL_OPERATION.register(
    FUSED,
    _fused,
    priority=20,
    devices=triton_devices,
    checks=[
        gate(fused_scope_reason),  # a product out of scope is the library's choice: no notice about Triton
        requires_module("triton", TRITON_INSTALL),
        requires_min_capability(7, 5),
    ],
    traced=_fused_traced,
)


# --- ahead-of-time builds (entry point llamatelemetry.kernel_builds: tensorcore) ---------------------------------


def kernel_builds(device: DeviceInfo) -> Iterator[KernelBuild]:
    """The fused path's builds on ``device`` (listed beside the kernels:
    :func:`llamatelemetry_tensorcore._fused_aot.aot_builds`); none without Triton."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    from llamatelemetry_tensorcore._fused_aot import aot_builds

    yield from aot_builds(device)


def choose_fused_tiles(m: int, n: int, batch: int, device: torch.device) -> FusedTiles:
    """:func:`fused_tiles` for a tensor's device (its facts from core's cache: no device query per call)."""
    return fused_tiles(m, n, batch, get_device_info(device, refresh_memory=False))


def choose_split_k(m: int, n: int, k: int, batch: int, tiles: FusedTiles, device: torch.device) -> SplitK:
    """:func:`split_k` for a tensor's device (its facts from core's cache)."""
    return split_k(m, n, k, batch, tiles, get_device_info(device, refresh_memory=False))
