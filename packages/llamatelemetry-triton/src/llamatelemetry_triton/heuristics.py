"""Launch configurations, chosen from the shape, the dtype and the device: never measured, never random.

Every chooser here is a pure function of ``(shape, dtype, DeviceInfo)`` (plus an optional block cap that the
launchers take from :func:`force_max_block_size`), so that the launcher that runs a kernel
and the ahead-of-time provider (:mod:`llamatelemetry_triton.aot`) that compiles it for a T4, an A100 or an H100
agree on what would be launched. Autotuning is deliberately not used: the interpreter cannot benchmark, a
first-call tuning pass would land inside CUDA-graph captures, and these kernels are memory bound, where a
good heuristic is within noise of the best configuration.

The rules of thumb:

* a row-wise kernel keeps a whole row in registers (fp32) when it fits in one block of at most
  ``max_single_block`` elements, and otherwise loops over the row in blocks;
* warps grow with the block so that each thread moves about 32 bytes per load (two 16-byte vectors);
* loops get two pipeline stages where the device's shared memory holds them (loads in flight hide latency),
  fewer where it does not: a T4 allows 64 KiB per block, an A100 163 KiB, an H100 227 KiB;
* a softmax row too long for one block is split over several programs when there are too few rows to fill
  the GPU (a 32 x 128256 logits tensor), each computing partial statistics that are then combined.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from llamatelemetry_core.device import DeviceInfo
from llamatelemetry_core.errors import ConfigurationError

__all__ = [
    "ARGMAX_BLOCK",
    "ARGMAX_PROGRAMS_PER_SM",
    "LINEAR_MAX_ROWS",
    "LINEAR_TABLES",
    "NORM_BWD_MAX_HELD_ROW",
    "NORM_BWD_MAX_SINGLE_BLOCK",
    "NORM_BWD_SUM_BLOCK",
    "NORM_LOOP_BLOCK",
    "NORM_MAX_SINGLE_BLOCK",
    "SMALL_M_MAX_ROWS",
    "SOFTMAX_LOOP_BLOCK",
    "SOFTMAX_MAX_SINGLE_BLOCK",
    "SOFTMAX_MAX_SPLITS",
    "LaunchConfig",
    "LinearTable",
    "argmax_config",
    "current_max_block_size",
    "elementwise_config",
    "force_max_block_size",
    "glu_config",
    "linear_config",
    "linear_device_class",
    "next_power_of_2",
    "norm_backward_programs",
    "norm_config",
    "rope_config",
    "rope_store_tile",
    "small_m_config",
    "softmax_config",
]

NORM_MAX_SINGLE_BLOCK = 16384
"""Longest row (elements) the norm forward keeps in registers; longer rows loop (and read their input again).

At 16384 with 16 warps every forward variant fits in the 128 registers a 512-thread program may use, with no
spills (sm_75 and sm_90, fp16 and fp32, checked with ``cuobjdump -res-usage``), so hidden sizes up to 16384 (a
405B model's) are read once."""
NORM_BWD_MAX_SINGLE_BLOCK = 16384
"""Longest row (elements) the norm backward takes in one block, for 2-byte dtypes whose rows are a multiple of 16
(vector loads). Past :data:`NORM_BWD_MAX_HELD_ROW` nothing fits the registers: RMSNorm holds the row anyway in 16
warps (96-136 bytes of spill stores and loads per thread on sm_75/sm_90), LayerNorm keeps only its weight and
bias gradient accumulators across rows and reads each row twice in 32 warps (in blocks for the two sums, then
whole for dx, from L1/L2; 8-128 bytes of spills). Both were the fastest launches an H200 sweep timed at
4096 x 16384 (``benchmarks/results/nvidia-h200/triton-norm-backward/``). fp32 rows stop at
:data:`NORM_BWD_MAX_HELD_ROW`: their loads alone need twice the registers. Longer rows loop."""
NORM_BWD_MAX_HELD_ROW = 8192
"""Longest row the norm backward holds in registers without spilling, from its one read to ``dx`` (weight held
too): about seven row-sized fp32 values per element. See :data:`NORM_BWD_MAX_SINGLE_BLOCK` for longer rows."""
NORM_BWD_SUM_BLOCK = 2048
"""Block of a re-read row's first read (its two sums) in the norm backward: with 2048, RMSNorm (its first read
unrolled or not), fused add + RMSNorm and LayerNorm fit with no spills on sm_75 and sm_90 under Triton 3.6 and
3.9; 4096 spills 8-16 bytes in some of them."""
NORM_LOOP_BLOCK = 4096
"""Block of a norm kernel looping over a row longer than its single-block limit."""
SOFTMAX_MAX_SINGLE_BLOCK = 16384
"""Longest row a softmax keeps in registers; only the row itself is held, so it can be twice a norm's."""
SOFTMAX_LOOP_BLOCK = 4096
SOFTMAX_MAX_SPLITS = 64
_ELEMENTWISE_BYTES_PER_PROGRAM = 8192
_VECTOR_BYTES = 16
_ELEMENTWISE_WARPS = 8
_BYTES_PER_THREAD = 32

_MEMO_LIMIT = 4096
_F = TypeVar("_F", bound=Callable[..., "LaunchConfig | None"])

_max_block: contextvars.ContextVar[int | None] = contextvars.ContextVar("llamatelemetry_max_block", default=None)


@dataclass(frozen=True)
class LaunchConfig:
    """How one kernel is launched: block size (elements), warps, pipeline stages, and row strategy.

    ``single_block`` is true when a whole row fits in one block (held in registers); ``reread_row`` when such a
    row is read twice rather than held from its first read to its last use (norm backward of long rows), its
    first read in blocks of ``chunk_size``, ``unrolled`` of them unrolled at compile time (0: a loop at run time);
    ``splits`` is the number of programs sharing one row (softmax of very long rows), each taking ``chunk_size``
    elements; ``chunk_size`` is also the heads RoPE rotates at once; ``programs`` is a fixed grid size where the
    kernel loops over rows or blocks itself (norm backward, the few-row linear kernel), else 0.
    """

    block_size: int
    num_warps: int
    num_stages: int = 1
    single_block: bool = True
    reread_row: bool = False
    unrolled: int = 0
    splits: int = 1
    chunk_size: int = 0
    programs: int = 0


def _memoized(fn: _F) -> _F:
    """Cache a chooser's answers: they are pure, and sit on every launch's hot path.

    A :class:`DeviceInfo` argument is keyed by identity (hashing its fields costs as much as the chooser) and
    kept alive beside the answer, so a key is never reused by another object. The cache is dropped when it
    reaches ``_MEMO_LIMIT`` entries (shapes that vary without bound, such as softmax row counts).
    """
    cache: dict[tuple[Any, ...], tuple[tuple[Any, ...], LaunchConfig | None]] = {}

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> LaunchConfig | None:
        key = (*(id(a) if isinstance(a, DeviceInfo) else a for a in args), *kwargs.items())
        hit = cache.get(key)
        if hit is not None:
            return hit[1]
        config = fn(*args, **kwargs)
        if len(cache) >= _MEMO_LIMIT:
            cache.clear()
        cache[key] = (args, config)  # args keep the DeviceInfo alive while its id is a key
        return config

    return wrapper  # type: ignore[return-value]


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def current_max_block_size() -> int | None:
    """The cap set by :func:`force_max_block_size` in this thread or task, else ``None``."""
    return _max_block.get()


@contextlib.contextmanager
def force_max_block_size(block_size: int) -> Iterator[None]:
    """Within the block, row kernels use blocks of at most ``block_size`` elements (a power of two >= 16).

    For tests and experiments: a small cap makes rows "longer than a block" cheap to build, so the looped and
    split code paths run on tiny inputs (in the interpreter too).
    """
    given: object = block_size  # validated at run time whatever the annotation says
    if isinstance(given, bool) or not isinstance(given, int) or given < 16:
        raise ConfigurationError(f"expected block_size to be a power of two >= 16, got {block_size!r}")
    if block_size & (block_size - 1):
        raise ConfigurationError(
            f"expected block_size to be a power of two >= 16, got {block_size}; try {next_power_of_2(block_size)}"
        )
    token = _max_block.set(block_size)
    try:
        yield
    finally:
        _max_block.reset(token)


def _element_size(dtype: torch.dtype) -> int:
    return int(dtype.itemsize)


def _warps_for(block_size: int, element_size: int, *, low: int = 1, high: int = 16) -> int:
    warps = block_size * element_size // (32 * _BYTES_PER_THREAD)
    return max(low, min(high, next_power_of_2(warps)))


def _stages_that_fit(block_size: int, element_size: int, loads: int, device: DeviceInfo, wanted: int = 2) -> int:
    """Pipeline stages whose buffers (``loads`` blocks each) fit in half the device's shared memory."""
    limit = device.shared_memory_per_block_bytes
    if limit is None:  # the CPU (interpreter): no shared memory to respect
        return wanted
    stages = wanted
    while stages > 1 and block_size * element_size * loads * stages > limit // 2:
        stages -= 1
    return stages


def _cap(max_single: int, max_block: int | None) -> int:
    return max_single if max_block is None else min(max_single, max_block)


@_memoized
def norm_config(
    n_cols: int,
    dtype: torch.dtype,
    device: DeviceInfo,
    *,
    backward: bool = False,
    max_block: int | None = None,
    layernorm: bool = False,
) -> LaunchConfig:
    """LayerNorm / RMSNorm over rows of ``n_cols`` elements of ``dtype`` (``backward``: the gradient kernel).

    The backward holds about seven row-sized fp32 values per element (x, dy, weight, two accumulators, ...), so
    it gets twice the warps of the forward, up to 16, to stay within the registers ptxas allows per thread.
    Past :data:`NORM_BWD_MAX_HELD_ROW` that no longer fits, and 2-byte rows of up to
    :data:`NORM_BWD_MAX_SINGLE_BLOCK` whose length is a multiple of 16 (vector loads: scalar ones need more
    registers) are taken in one block anyway: RMSNorm holds them in 16 warps although they spill (measured
    faster than reading them twice), LayerNorm reads them twice in 32 warps (``reread_row``, the first read a loop
    over blocks of :data:`NORM_BWD_SUM_BLOCK`); other rows loop.
    The LayerNorm forward (``layernorm``) keeps rows of up to 8192 elements in at most 8 warps: its two
    reductions cross fewer warps (H200, 16384 x 8192 fp16: 89.0% -> 95.0% of a copy in a sweep of warps,
    ``benchmarks/results/nvidia-h200/triton/norm-warps-sweep.txt``); at 16384 it
    needs 16 to stay well inside the registers.
    """
    size = _element_size(dtype)
    block = next_power_of_2(n_cols)
    if backward:
        reread = block > NORM_BWD_MAX_HELD_ROW and size <= 2 and n_cols % 16 == 0
        cap = _cap(NORM_BWD_MAX_SINGLE_BLOCK if reread else NORM_BWD_MAX_HELD_ROW, max_block)
        if block <= cap:
            if reread and not layernorm:
                # RMSNorm holds even these rows, though they spill: H200, 4096 x 16384 fp16, held in 16 warps
                # 0.133 ms (72% of a copy), read twice 0.231 ms (sweep_norm_backward.py, triton-norm-backward/).
                return LaunchConfig(block, 16)
            # LayerNorm reads them twice, in 32 warps (same sweep: 0.216 ms, against 0.255 in 16 and 0.274 held);
            # the first read loops over blocks of NORM_BWD_SUM_BLOCK (``unrolled`` would unroll it: not timed).
            warps = 32 if reread else min(16, 2 * _warps_for(block, size))
            chunk = NORM_BWD_SUM_BLOCK if reread else 0
            return LaunchConfig(block, warps, reread_row=reread, chunk_size=chunk)
    elif block <= _cap(NORM_MAX_SINGLE_BLOCK, max_block):
        warps = _warps_for(block, size)
        if layernorm and block <= NORM_BWD_MAX_HELD_ROW:
            warps = min(warps, 8)
        return LaunchConfig(block, warps)
    # x and a residual are streamed; weight and bias are re-read per block from L2.
    block = min(_cap(NORM_MAX_SINGLE_BLOCK, max_block), NORM_LOOP_BLOCK)
    warps = _warps_for(block, size)
    stages = _stages_that_fit(block, size, 2, device)
    return LaunchConfig(block, min(16, 2 * warps) if backward else warps, stages, single_block=False)


def norm_backward_programs(n_rows: int, device: DeviceInfo) -> int:
    """Programs of the norm backward: each owns consecutive rows and one row of weight/bias gradient partials.

    Two per SM keeps the partial buffer (programs x n_cols fp32) small next to the rows while filling the GPU.
    """
    return max(1, min(n_rows, 2 * device.sm_count))


@_memoized
def softmax_config(
    n_rows: int, n_cols: int, dtype: torch.dtype, device: DeviceInfo, *, max_block: int | None = None
) -> LaunchConfig:
    """Softmax over rows of ``n_cols``: one block per row when it fits, else looped and possibly split."""
    size = _element_size(dtype)
    block = next_power_of_2(n_cols)
    cap = _cap(SOFTMAX_MAX_SINGLE_BLOCK, max_block)
    if block <= cap:
        return LaunchConfig(block, _warps_for(block, size))
    loop_block = min(cap, SOFTMAX_LOOP_BLOCK)
    warps = _warps_for(loop_block, size, low=4)
    stages = _stages_that_fit(loop_block, size, 1, device)
    # Enough programs for ~4 per SM; each split is a whole number of blocks.
    wanted = -(-4 * device.sm_count // max(n_rows, 1))
    blocks_per_row = -(-n_cols // loop_block)
    splits = max(1, min(wanted, blocks_per_row, SOFTMAX_MAX_SPLITS))
    chunk = -(-blocks_per_row // splits) * loop_block
    splits = -(-n_cols // chunk)
    return LaunchConfig(loop_block, warps, stages, single_block=False, splits=splits, chunk_size=chunk)


ARGMAX_BLOCK = 2048
"""Elements of a row an arg-max program reads per step (eight warps: 8 bytes of fp16 per thread)."""

ARGMAX_PROGRAMS_PER_SM = 4
"""Programs an arg-max aims for per SM: a row is cut into chunks (each at least four blocks) until the rows'
chunks reach that many, so that one row of 128256 logits is read by a dozen SMs rather than one.

Both constants from an H200 (``benchmarks/triton/bench_argmax.py --sweep``, 1 to 256 rows of 49152 and 128256
fp16 logits, blocks of 1024-4096 on 4 or 8 warps, 1, 2 or 4 programs per SM): 2048 on 8 warps with 4 per SM was
the fastest from 32 rows on (2-5% ahead of 2 per SM), and within 4% of the fastest (1024 elements) below."""

_ARGMAX_INTERPRETED_SPLITS = 3  # the interpreter (no SMs to fill) still cuts rows, so both launches are tested


@_memoized
def argmax_config(
    n_rows: int,
    n_cols: int,
    device: DeviceInfo,
    *,
    max_block: int | None = None,
    block: int = ARGMAX_BLOCK,
    programs_per_sm: int = ARGMAX_PROGRAMS_PER_SM,
) -> LaunchConfig:
    """The arg-max of ``n_rows`` rows of ``n_cols``: ``block_size`` elements per step, ``splits`` chunks of
    ``chunk_size`` elements (a whole number of blocks) per row; one chunk stores the row's index itself.
    ``block`` and ``programs_per_sm`` replace the module's constants (for sweeps)."""
    block = max(16, min(_cap(block, max_block), next_power_of_2(n_cols)))
    blocks = -(-n_cols // block)
    if device.is_cuda:
        wanted = -(-programs_per_sm * device.sm_count // max(n_rows, 1))
        splits = max(1, min(wanted, blocks // 4))
    else:
        splits = max(1, min(_ARGMAX_INTERPRETED_SPLITS, blocks))
    chunk = -(-blocks // splits) * block
    warps = max(1, min(8, block // 256))
    return LaunchConfig(block, warps, 3, single_block=False, splits=-(-n_cols // chunk), chunk_size=chunk)


@_memoized
def elementwise_config(numel: int, dtype: torch.dtype, device: DeviceInfo, *, strided: bool = False) -> LaunchConfig:
    """A flat elementwise kernel (add): 16 bytes of each operand per thread (one vector load), eight warps.

    Measured on an H100 at 4096x4096 and 16384x8192 fp16: any block at 16 bytes per thread reaches the copy
    bandwidth, while 32 or 64 bytes per thread with four warps lose 7-13% at the larger size.
    ``strided`` (broadcasting): 1024 elements, since each one's 64-bit index arithmetic costs registers.
    """
    size = _element_size(dtype)
    per_thread = max(1, _VECTOR_BYTES // size)
    per_program = 1024 if strided else _ELEMENTWISE_WARPS * 32 * per_thread
    block = max(16, min(per_program, next_power_of_2(numel)))
    return LaunchConfig(block, max(1, min(_ELEMENTWISE_WARPS, block // (32 * per_thread))))


@_memoized
def glu_config(n_cols: int, dtype: torch.dtype, device: DeviceInfo, *, max_block: int | None = None) -> LaunchConfig:
    """SwiGLU / GeGLU over rows of ``n_cols`` outputs; wide rows are cut into several programs."""
    size = _element_size(dtype)
    cap = _cap(_ELEMENTWISE_BYTES_PER_PROGRAM // size, max_block)
    block = max(16, min(cap, next_power_of_2(n_cols)))
    return LaunchConfig(block, max(1, min(4, block // 256)), single_block=block >= n_cols)


@_memoized
def rope_config(rotary_half: int, num_heads: int, dtype: torch.dtype, device: DeviceInfo) -> LaunchConfig:
    """RoPE: one program per token; ``block_size`` covers half the rotary dimension; heads go in groups.

    ``chunk_size`` is the number of heads rotated at once (a power of two), keeping a group near 2048 pairs.
    """
    block_d = max(16, next_power_of_2(rotary_half))
    heads = max(1, min(next_power_of_2(num_heads), max(1, 2048 // block_d)))
    size = _element_size(dtype)
    return LaunchConfig(block_d, _warps_for(block_d * heads * 2, size, high=8), chunk_size=heads)


def rope_store_tile(num_kv_heads: int, head_dim: int) -> tuple[int, int]:
    """``(heads, block_d)`` of the whole heads the rotary cache store copies at once (values, and the features
    of the keys past the rotary ones): ``block_d`` covers the head, a group keeps near 4096 elements like a
    rotation group of :func:`rope_config`."""
    block_d = max(16, next_power_of_2(head_dim))
    return max(1, min(next_power_of_2(num_kv_heads), 4096 // block_d)), block_d


LINEAR_MAX_ROWS = 8
"""Most rows (tokens) the few-row linear kernels take. Each program reads its slice of the weight once and
multiplies every row by it on CUDA cores, so the weight's bytes bound the time only while the rows are few; past
this a Tensor Core kernel is faster: the small-M kernel (up to :data:`SMALL_M_MAX_ROWS` rows, the plain and SwiGLU
forms, where :func:`small_m_config` has a launch), else ``F.linear``."""


@dataclass(frozen=True)
class LinearTable:
    """The few-row linear launch region of one device class: the weight block the loop over ``K`` reads
    (``block_k`` elements of each of ``block_n`` weight rows), the largest tile ``rows x block_n x block_k``
    (in fp32 registers), and the programs per SM the grid aims at (enough weight rows in flight to cover the
    memory latency).

    ``hoist_elements`` (0: never) is the largest input block, ``rows x K`` rounded up to powers of two, that a
    program holds in registers while it walks several column blocks (``hoist_block_n`` weight rows each, the
    next block's weight loaded before the current one's product): a persistent grid of ``hoist_programs_per_sm``
    programs per SM (half as many past ``K`` = 4096, where the program's warps double).
    """

    block_k: int
    max_tile: int
    max_block_n: int
    programs_per_sm: int
    num_warps: int
    num_stages: int
    hoist_elements: int = 0
    hoist_block_n: int = 2
    hoist_programs_per_sm: int = 4


LINEAR_TABLES: dict[str, LinearTable] = {
    # H100/H200: one row at Llama-3.2-1B's shapes, each launch timed inside a CUDA graph over 16 layers' weights
    # (as a decode step runs them; gemv-in-graph.md in its first version): BLOCK_N=4,
    # BLOCK_K=2048 was the fastest of 24 launches (BLOCK_N 2-16, BLOCK_K 1024-4096, 4 or 8 warps) for q/k/v with
    # the norm (7.0 us), o (4.9 us) and gate/up with the norm (21.0 us) with 4 warps, and for down with the SwiGLU
    # prologue with 8 (13.4 us; 13.6 with 4). Three programs per SM gives BLOCK_N=4 from 2048 weight rows on 132
    # SMs. The previous row (BLOCK_K 1024, BLOCK_N 2, six programs per SM) came from benchmarks/triton/sweep_gemv.py,
    # timed the same way but swept only up to BLOCK_K 1024.
    #
    # Persistent launches (``hoist_elements``), each program reading and normalizing its input rows once and walking
    # column blocks of two weight rows with the next block's weight loaded ahead, then beat those at one row, timed
    # the same way (gemv-in-graph.md of 2026-12-02, third session; 42 launches per projection): q/k/v with the norm
    # 6.60 us, o 4.47, gate/up with the norm 21.08 (the fastest, 4 weight rows and 8 warps, 20.40), down with the SwiGLU
    # prologue, its whole K = 8192 held by 8 warps in 264 programs, 11.89. In an earlier sweep the same day the
    # launch above took 7.00, 5.31, 20.13 and 14.60 us against 6.61, 5.00, 19.96 and 12.72; engine decode at
    # batch 1 went from 993 to 1,056 tokens/s. At four rows they beat the launches above 1.1-1.9x for q/k/v, o and
    # gate/up (summary.md of that session; cuBLAS beats both for q/k/v and gate/up). K = 4096 (an
    # 8B's hidden size) is unmeasured: 4 warps there, which compile without spills (8 spilled 48 bytes with the norm).
    "sm90": LinearTable(
        block_k=2048, max_tile=16384, max_block_n=4, programs_per_sm=3, num_warps=4, num_stages=2, hoist_elements=8192
    ),
    # Ampere/Ada: less shared memory and bandwidth per SM; smaller stages.
    "sm80": LinearTable(block_k=512, max_tile=8192, max_block_n=32, programs_per_sm=4, num_warps=4, num_stages=2),
    # T4: 64 KiB of shared memory per block and 40 SMs; Triton emits FMA loops there, short blocks keep
    # registers free.
    "sm75": LinearTable(block_k=256, max_tile=4096, max_block_n=16, programs_per_sm=4, num_warps=4, num_stages=2),
    # The interpreter (CPU tensors): few, wide programs, since each program costs Python time.
    "cpu": LinearTable(block_k=256, max_tile=1 << 20, max_block_n=32, programs_per_sm=1, num_warps=4, num_stages=1),
}


def linear_device_class(device: DeviceInfo) -> str:
    """The key of :data:`LINEAR_TABLES` for ``device``: ``sm90`` from compute capability 9.0 on, ``sm80`` from
    8.0, ``sm75`` below, ``cpu`` for the CPU."""
    if device.compute_capability is None:
        return "cpu"
    if device.compute_capability >= (9, 0):
        return "sm90"
    return "sm80" if device.compute_capability >= (8, 0) else "sm75"


@_memoized
def linear_config(
    rows: int, n: int, k: int, dtype: torch.dtype, device: DeviceInfo, *, max_block: int | None = None
) -> LaunchConfig:
    """The few-row linear ``[rows, k] @ [n, k]^T`` (``rows <= LINEAR_MAX_ROWS``): ``block_size`` is BLOCK_N (weight
    rows per program), ``chunk_size`` BLOCK_K (the step of the loop over ``k``), from the device's
    :data:`LINEAR_TABLES` row.

    BLOCK_N is the largest power of two up to the table's that still gives ``programs_per_sm`` programs per SM
    and keeps ``rows x BLOCK_N x BLOCK_K`` within the tile bound; BLOCK_K is the table's, shortened to ``k``
    (and to ``max_block``, the cap of :func:`force_max_block_size`), and halved while ``rows x BLOCK_K`` (rows
    rounded up to a power of two) exceeds half the tile bound.
    """
    table = LINEAR_TABLES[linear_device_class(device)]
    block_m = next_power_of_2(rows)
    whole_k = max(16, next_power_of_2(k))
    wide = whole_k > 4096  # a long input row: twice the warps to hold it, half the programs
    per_sm = max(1, table.hoist_programs_per_sm // 2) if wide else table.hoist_programs_per_sm
    blocks = -(-n // table.hoist_block_n)  # column blocks (with SwiGLU: gate rows, each with its up rows)
    if (
        0 < block_m * whole_k <= table.hoist_elements
        and whole_k <= _cap(whole_k, max_block)
        and blocks > per_sm * device.sm_count  # fewer programs than blocks: else the loop over K below
    ):
        return LaunchConfig(
            table.hoist_block_n,
            8 if wide else 4,
            1,
            single_block=True,
            chunk_size=whole_k,
            programs=per_sm * device.sm_count,
        )
    block_k = max(16, min(_cap(table.block_k, max_block), next_power_of_2(k)))
    # The input tile (rows x BLOCK_K, fp32) shares the registers with the weight's: at most half the tile bound
    # (sm_90 at 8 rows and BLOCK_K 2048 spilled 80 bytes per thread under Triton 3.6; at 1024, none).
    while block_k > 16 and block_m * block_k > table.max_tile // 2:
        block_k //= 2
    target = table.programs_per_sm * device.sm_count
    block_n = 1
    while (
        block_n < table.max_block_n
        and -(-n // (2 * block_n)) >= target
        and block_m * 2 * block_n * block_k <= table.max_tile
    ):
        block_n *= 2
    return LaunchConfig(block_n, table.num_warps, table.num_stages, single_block=block_k >= k, chunk_size=block_k)


SMALL_M_MAX_ROWS = 64
"""Most rows the small-M linear kernel (Tensor Cores, all rows in one tile) takes past :data:`LINEAR_MAX_ROWS`;
more rows run ``F.linear``."""


@_memoized
def small_m_config(
    rows: int, n: int, k: int, swiglu: bool, dtype: torch.dtype, device: DeviceInfo
) -> LaunchConfig | None:
    """The small-M linear ``[rows, k] @ [n, k]^T`` (``LINEAR_MAX_ROWS < rows <= SMALL_M_MAX_ROWS``; ``n`` output
    columns, halves of a ``[2n, k]`` gate/up weight with ``swiglu``): ``block_size`` is BLOCK_N, ``chunk_size``
    BLOCK_K, ``splits`` the split of ``k``. Chosen on Hopper (compute capability 9.x), where its launches were
    measured, and in the interpreter (CPU tensors, the same launches); ``None`` elsewhere (no launch of it has
    been timed against cuBLAS there: ``F.linear`` runs), for a dtype other than fp16/bf16 (fp32 products there
    would run as TF32), and for bf16 in the interpreter.

    From an H200 at 64 rows and Llama-3.2-1B's shapes, each launch timed inside a CUDA graph over 16 layers'
    weights with programmatic dependent launch (``benchmarks/results/nvidia-h200/engine/summary.md``), of
    BLOCK_N 16-128, BLOCK_K 64-256, 1-8 splits and 3-6 stages: q/k/v (3072 x 2048) BLOCK_N 32 (7.30 us against
    cuBLAS's 7.36), o (2048 x 2048) BLOCK_N 16 (6.33 against 6.87), gate/up with SwiGLU (2 x 8192 x 2048) BLOCK_N
    64 and 4 stages (19.15 against 24.31 for cuBLAS and the SwiGLU kernel), down (2048 x 8192) BLOCK_N 32 in two
    splits (15.38 against 15.10); BLOCK_K 128, 6 stages elsewhere. The rules: SwiGLU takes the gate/up launch;
    ``k >= 4n`` (a long reduction over few columns) the down launch; ``n <= 2048`` the o launch; else q/k/v's.
    """
    cc = device.compute_capability
    if (cc is not None and cc[0] != 9) or dtype not in (torch.float16, torch.bfloat16):
        return None
    if cc is None and dtype == torch.bfloat16:
        return None  # NumPy has no bfloat16: the interpreter's bf16 products are garbage (Triton 3.6)
    if swiglu:
        block_n, stages, splits = 64, 4, 1
    elif k >= 4 * n:
        block_n, stages, splits = 32, 6, 2
    elif n <= 2048:
        block_n, stages, splits = 16, 6, 1
    else:
        block_n, stages, splits = 32, 6, 1
    block_k = max(16, min(128, next_power_of_2(k)))
    block_n = max(16, min(block_n, next_power_of_2(n)))
    return LaunchConfig(block_n, 4, stages, single_block=block_k >= k, splits=splits, chunk_size=block_k)
