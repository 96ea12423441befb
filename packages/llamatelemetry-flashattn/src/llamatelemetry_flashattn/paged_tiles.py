"""Launch shape of the paged attention kernel: tiles and KV splits, pure functions of shapes and the device.

One program of :mod:`.paged_kernel` owns ``BLOCK_M`` packed rows (queries x the query heads of one KV head) of
one sequence and walks ``BLOCK_N`` keys at a time through that sequence's pages. Its shared memory is at most::

    num_stages * 2 * BLOCK_N * BLOCK_D * kv_size       (K and V tiles as stored, in flight)
  + 2 * BLOCK_N * BLOCK_D * q_size                      (quantized storage: the tiles converted for the dot)
  + BLOCK_M * BLOCK_D * q_size + BLOCK_M * BLOCK_N * q_size   (the queries, the probabilities)

That bound is what the fitting loop of :func:`choose_paged_tiles` checks; Triton buffers fewer tiles than
``num_stages``, since the tile's block ids are a load the K and V addresses depend on. Under Triton 3.6 (head dim
64, 128-key tiles, compiled for sm_90) 2 to 4 stages keep one K and one V buffer, whose next tile is loaded only
once the current one is used; 5 and 6 stages keep two, so the next tile loads while the current one is computed;
7 keep three. 1 stage loads straight into registers.

Decode (a handful of rows per program) is memory-bound: the smallest tensor-core row tile (16), 4 warps, wide key
tiles where shared memory allows. A chunk of prefill is compute-bound. Both read one table per device class
(``_DECODE``, ``_PREFILL``), so a measured sweep changes one row. Decode over short key ranges (the block table
bounds every sequence at :data:`SHORT_KEY_RANGE` keys or fewer) reads ``_DECODE_SHORT`` where it has a row: with
a handful of tiles per program there is no loop worth pipelining, and smaller tiles leave room for more programs
per multiprocessor. A T4 (Turing) allows 64 KiB per block:
preferences shrink until the estimate fits, and the AOT check (``python -m llamatelemetry_core.aot --device
t4``) compiles the result and confirms it.

Split-KV (flash-decoding): when ``batch x kv_heads x row tiles`` programs cannot fill the GPU (small batches,
long contexts), each program's key range is cut into ``num_splits`` parts computed by separate programs and
merged by a second, small kernel. The split count is chosen on the host from shapes alone (the block table's
width bounds every sequence's length), never from ``seq_lens``, so a call stays CUDA-graph capturable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.kv_layout import PagedKV
from llamatelemetry_flashattn.tiles import MAX_HEAD_DIM, padded_head_dim

__all__ = [
    "DEEP_PIPELINE_MIN_TILES",
    "DEEP_PIPELINE_PROGRAMS_PER_SM",
    "MAX_SPLITS",
    "MERGE_BLOCK_S",
    "MIN_TOKENS_PER_SPLIT",
    "SHORT_KEY_RANGE",
    "SPLIT_TARGET_PROGRAMS_PER_SM",
    "PagedLaunch",
    "PagedTiles",
    "choose_num_splits",
    "choose_paged_tiles",
    "device_class",
    "merge_warps",
    "paged_launch_config",
    "uses_page_ids",
]

_MIN_TILE = 16
MAX_SPLITS = 32
"""The most parts one sequence's keys are split into."""
MERGE_BLOCK_S = 32
"""Lanes of the merge kernel: one power of two >= ``MAX_SPLITS`` for every split count (one compiled kernel)."""
MIN_TOKENS_PER_SPLIT = 256
"""A split reads at least this many keys, so that its partial result costs less to merge than it saved (short-range
decode with its own tiles: one tile of keys)."""
SPLIT_TARGET_PROGRAMS_PER_SM = 1.0
"""Splits are added until there are this many programs per multiprocessor (none when there already are)."""
_DECODE_ROWS = 64
SHORT_KEY_RANGE = 512
"""Decode whose block table bounds every sequence at this many keys or fewer reads ``_DECODE_SHORT`` first."""


@dataclass(frozen=True)
class PagedTiles:
    """One launch configuration of the paged attention kernel."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int
    page_ids: bool = False
    """Load one block id per page (not per key) when a tile spans several whole pages (``BLOCK_N % page_size ==
    0``); other page sizes ignore it."""

    def shared_memory_estimate(self, q_size: int, kv_size: int) -> int:
        """Bytes of shared memory the kernel is expected to need (see the module docstring)."""
        stored = self.num_stages * 2 * self.block_n * self.block_d * kv_size
        converted = 2 * self.block_n * self.block_d * q_size if kv_size < q_size else 0
        rows = (self.block_m * self.block_d + self.block_m * self.block_n) * q_size
        return stored + converted + rows

    def fits(self, q_size: int, kv_size: int, device: DeviceInfo) -> bool:
        """Whether :meth:`shared_memory_estimate` fits ``device``'s shared memory per block (48 KiB if unknown)."""
        return self.shared_memory_estimate(q_size, kv_size) <= (device.shared_memory_per_block_bytes or 48 * 1024)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# The launch preferences, one row per (device class, phase, widest head dim): (BLOCK_N, num_warps, num_stages,
# page_ids) for decode (BLOCK_M follows the rows), (BLOCK_M, BLOCK_N, num_warps, num_stages, page_ids) for prefill.
# Device classes: "hopper" (sm_90+ with >= 160 KiB per block), "ampere" (sm_80 with >= 160 KiB: A100), "small"
# (other sm_80+: sm_86/sm_89 with ~100 KiB), "turing" (sm_75: no cp.async, 64 KiB). Measured on an H200: decode of
# head dim 128 reads fastest 128 keys per tile with 4 warps, 4 stages and one block id per page (0.1389 ms at
# batch 32, context 4096, page 16: the best of 16 decode configurations; 64 keys per tile took 0.1602 ms);
# prefill of head dim 128 fastest at 128x64, 4 warps, 3 stages, block ids per page. Other rows follow the same
# shared-memory reasoning (:func:`choose_paged_tiles` shrinks any row that does not fit). ``page_ids`` selects the
# kernel's one-block-id-per-page address path when a tile spans several whole pages.
_DECODE: dict[tuple[str, int], tuple[int, int, int, bool]] = {
    # Head dim 64, measured on an H200 (32 query / 8 KV heads, page 16, contexts 1024-4096, batch 4-64;
    # benchmarks/flashattn/sweep_paged_decode.py): 128 keys, 2 stages, one block id per page was the best or within
    # 1% of it everywhere (batch 64, context 1024: 49.0 us against 58.1 for the earlier 3 stages with an id per
    # key); 64-key tiles took 1.1-1.3x at contexts >= 2048. Launches with few programs per SM read _DECODE_DEEP.
    ("hopper", 64): (128, 4, 2, True),
    ("hopper", 128): (128, 4, 4, True),
    ("hopper", 256): (32, 4, 3, False),
    ("ampere", 64): (128, 4, 3, False),
    ("ampere", 128): (128, 4, 2, False),
    ("ampere", 256): (32, 4, 3, False),
    ("small", 64): (64, 4, 3, False),
    ("small", 128): (64, 4, 2, False),
    ("small", 256): (32, 4, 2, False),
    # Turing: FMA dots (no mma.sync from Triton for sm_75) hold their operands in registers; the largest tiles
    # that compile for sm_75 with no spills (a sweep of 16/32/64 x 16/32/64 in 4 and 8 warps; not timed on a T4).
    ("turing", 64): (64, 8, 2, False),
    ("turing", 128): (32, 8, 2, False),
    ("turing", 256): (16, 8, 1, False),
}
# Key ranges of at most SHORT_KEY_RANGE (the engine's decode at max_model_len 512). Measured on an H200, head dim 64,
# context 192 in a table of 512 keys (same script): 64 keys, 1 stage, ids took 16.5 us at batch 64 against 22.2 for
# the earlier row (128 keys, 3 stages, an id per key), the best of 48 tile configurations; at batch 1 and 8 it was
# within 1.05x of the best. Whole engine decode, Llama-3.2-1B shape: these tiles +5.5% at batch 64 (none at 1 and
# 8); splitting to one tile per part (paged_launch_config) then +1.6% at batch 1 and +0.6% at 8.
_DECODE_SHORT: dict[tuple[str, int], tuple[int, int, int, bool]] = {
    ("hopper", 64): (64, 4, 1, True),
}
# Long-range decode with fewer than DEEP_PIPELINE_PROGRAMS_PER_SM programs (splits included) per multiprocessor,
# each split spanning at least DEEP_PIPELINE_MIN_TILES tiles by the table's bound: the stages that double-buffer K
# and V (see the module docstring). At 4 programs per SM (registers and shared memory allow 4 with one buffer, 3
# with two) the others' loads hide each program's latency; with 2 or fewer, each program has to overlap its own
# loads, which takes a loop of several tiles. Measured on an H200 with Triton 3.6 (benchmarks/flashattn/
# sweep_paged_decode.py; other Triton versions may buffer differently, and the sweep checks the choice), fp16,
# head dim 64, 32 query / 8 KV heads, pages of 16, 128-key tiles, 5 stages against 2: batch 32 with lengths
# uniform in 100..2048 in a table of 2112 keys (256 programs) 38.1 against 45.7 us; batch 32 at context 4096
# 80.4 against 87.3; batch 4 at 4096 in 5 splits (160 programs) 24.2 against 27.6; batch 8 at 2048 in 3 splits
# (192) 24.7 against 25.7; each within 1.03x of the best of 13 launches. Batch 64 (512 programs) keeps 2 stages:
# 60.3 against 65.5 us with mixed lengths, 48.2 against 57.9 at context 1024. One sequence of 1024 keys in a
# table of 2112 (8 splits of 264 keys by the bound, one tile each in fact) took 11.2 us with 2 stages against 12.0
# or more with 5 in a scratch sweep of the same kernel. The row serves head dims up to 64 and every device of
# the "hopper" class (sm_90 and later); only the H200 at 64 was measured.
_DECODE_DEEP: dict[tuple[str, int], int] = {
    ("hopper", 64): 5,
}
DEEP_PIPELINE_PROGRAMS_PER_SM = 2.0
"""Long-range decode with fewer programs than this per multiprocessor (splits included), each split at least
``DEEP_PIPELINE_MIN_TILES`` tiles long by the table's bound and K and V stored in q's dtype, reads
``_DECODE_DEEP``."""
DEEP_PIPELINE_MIN_TILES = 4
"""Tiles of keys each split spans, by the block table's bound, before deeper pipelining pays."""
_PREFILL: dict[tuple[str, int], tuple[int, int, int, int, bool]] = {
    ("hopper", 64): (64, 64, 4, 3, False),
    ("hopper", 128): (128, 64, 4, 3, True),  # H200 sweep: 0.2445 ms, best of 14 prefill configurations
    ("hopper", 256): (64, 64, 8, 2, False),
    ("ampere", 64): (64, 64, 4, 3, False),
    ("ampere", 128): (128, 64, 8, 3, False),
    ("ampere", 256): (64, 64, 8, 2, False),
    ("small", 64): (64, 64, 4, 3, False),
    ("small", 128): (128, 64, 8, 2, False),
    ("small", 256): (64, 32, 4, 2, False),
    # Turing: as for decode, the largest tiles with no spills on sm_75 (64x64 at d=128 in 4 warps spilled 167 KB).
    ("turing", 64): (64, 32, 8, 2, False),
    ("turing", 128): (32, 16, 8, 2, False),
    ("turing", 256): (16, 16, 8, 1, False),
}


def device_class(device: DeviceInfo) -> str:
    """The row of the preference tables ``device`` reads: "hopper", "ampere", "small" or "turing"."""
    if not device.capability_at_least(8, 0):
        return "turing"
    if (device.shared_memory_per_block_bytes or 0) < 160 * 1024:
        return "small"
    return "hopper" if device.capability_at_least(9, 0) else "ampere"


def _table_key(block_d: int, device: DeviceInfo) -> tuple[str, int]:
    return device_class(device), 64 if block_d <= 64 else 128 if block_d <= 128 else 256


def _short_decode(block_d: int, rows: int | None, device: DeviceInfo, max_kv_len: int | None) -> bool:
    """Whether a launch reads ``_DECODE_SHORT``: decode rows, a short key range and a row for this device/head."""
    return (
        rows is not None
        and rows <= _DECODE_ROWS
        and max_kv_len is not None
        and max_kv_len <= SHORT_KEY_RANGE
        and _table_key(block_d, device) in _DECODE_SHORT
    )


def _preferred(block_d: int, rows: int | None, device: DeviceInfo, max_kv_len: int | None) -> PagedTiles:
    """The table's launch for this device class, head width, rows and key range, before fitting to shared memory."""
    key = _table_key(block_d, device)
    if rows is not None and rows <= _DECODE_ROWS:
        short = _short_decode(block_d, rows, device, max_kv_len)
        block_n, warps, stages, page_ids = _DECODE_SHORT[key] if short else _DECODE[key]
        return PagedTiles(max(_MIN_TILE, _next_pow2(rows)), block_n, block_d, warps, stages, page_ids)
    block_m, block_n, warps, stages, page_ids = _PREFILL[key]
    return PagedTiles(block_m, block_n, block_d, warps, stages, page_ids)


def choose_paged_tiles(
    head_dim: int,
    q_dtype: torch.dtype,
    kv_dtype: torch.dtype,
    device: DeviceInfo,
    *,
    rows_per_program: int | None = None,
    max_kv_len: int | None = None,
) -> PagedTiles:
    """The tiles the paged kernel uses on ``device``.

    ``rows_per_program`` is ``max_seqlen_q * num_heads / num_kv_heads`` (the packed rows of one sequence and KV
    head); ``None`` means "many" (prefill). ``max_kv_len`` bounds every sequence's keys (the block table's width
    times the page size; ``None``: unknown, taken as long). A CPU device (the Triton interpreter) gets 16-wide
    tiles: exact everywhere, and the interpreter's time grows with tile size.
    """
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"expected 0 < head_dim <= {MAX_HEAD_DIM}, got {head_dim}")
    block_d = padded_head_dim(head_dim)
    if max_kv_len is not None and max_kv_len < 0:
        raise ValueError(f"expected max_kv_len >= 0 or None, got {max_kv_len}")
    if not device.is_cuda:
        block_m = 16 if rows_per_program is None else max(_MIN_TILE, min(32, _next_pow2(rows_per_program)))
        return PagedTiles(block_m, 16, block_d, 4, 1)
    tiles = _preferred(block_d, rows_per_program, device, max_kv_len)
    q_size, kv_size = q_dtype.itemsize, kv_dtype.itemsize
    while not tiles.fits(q_size, kv_size, device):
        m, n, s = tiles.block_m, tiles.block_n, tiles.num_stages
        if s > 2 or (s > 1 and n <= 32):
            s -= 1
        elif n > 32:
            n //= 2
        elif m > _MIN_TILE:
            m //= 2
        elif n > _MIN_TILE:
            n //= 2
        else:
            break
        tiles = PagedTiles(m, n, block_d, tiles.num_warps, s, tiles.page_ids)
    return tiles


def uses_page_ids(tiles: PagedTiles, page_size: int) -> bool:
    """Whether the kernel takes the one-block-id-per-page path: asked for, and a tile spans whole pages."""
    return tiles.page_ids and page_size < tiles.block_n and tiles.block_n % page_size == 0


def choose_num_splits(
    programs: int, max_kv_len: int, device: DeviceInfo, *, min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT
) -> int:
    """How many parts each program's keys are cut into (1: no split-KV); see the module docstring.

    ``programs`` is ``batch * num_kv_heads * row_tiles``; ``max_kv_len`` an upper bound of every sequence's
    length known on the host (``block_tables.shape[1] * page_size``); a split reads at least
    ``min_tokens_per_split`` keys (a positive count).
    """
    if min_tokens_per_split < 1:
        raise ValueError(f"expected min_tokens_per_split >= 1, got {min_tokens_per_split}")
    if not device.is_cuda or programs <= 0:
        return 1
    target = int(device.sm_count * SPLIT_TARGET_PROGRAMS_PER_SM)
    if programs >= target:
        return 1
    wanted = -(-target // programs)
    by_length = max(1, max_kv_len // min_tokens_per_split)
    return max(1, min(wanted, by_length, MAX_SPLITS))


@dataclass(frozen=True)
class PagedLaunch:
    """Tiles and split count of one launch (what :func:`paged_launch_config` chooses)."""

    tiles: PagedTiles
    num_splits: int


def paged_launch_config(
    q: torch.Tensor,
    kv: PagedKV,
    block_tables: torch.Tensor,
    max_seqlen_q: int,
    device: DeviceInfo | None = None,
) -> PagedLaunch:
    """What the kernel launches for these inputs on ``device`` (default: q's device): ``q`` ``[num_tokens, H,
    D]``, ``kv`` core's paged layout, ``block_tables`` ``[batch, max_blocks]``; reads shapes only."""
    info = device if device is not None else get_device_info(q.device, refresh_memory=False)
    _, heads, head_dim = q.shape
    _, page_size, kv_heads, _ = kv.key_cache.shape
    group = heads // kv_heads
    rows = max(1, max_seqlen_q) * group
    max_kv_len = block_tables.shape[1] * page_size
    tiles = choose_paged_tiles(
        head_dim, q.dtype, kv.key_cache.dtype, info, rows_per_program=rows, max_kv_len=max_kv_len
    )
    programs = block_tables.shape[0] * kv_heads * -(-rows // tiles.block_m)
    # Short-range decode splits down to one tile per part (H200, head dim 64, context 192 of 512: 8 splits at
    # batch 1 made the whole engine's decode 1.6% faster than the 2 that 256 keys per split allow).
    short = _short_decode(tiles.block_d, rows, info, max_kv_len)
    splits = choose_num_splits(
        programs, max_kv_len, info, min_tokens_per_split=tiles.block_n if short else MIN_TOKENS_PER_SPLIT
    )
    deep = _DECODE_DEEP.get(_table_key(tiles.block_d, info))
    if (
        deep is not None
        and not short
        and tiles.block_m == _MIN_TILE  # measured with one row tile of 16 (queries x query heads per KV head <= 16)
        and programs * splits < DEEP_PIPELINE_PROGRAMS_PER_SM * info.sm_count
        and max_kv_len // splits >= DEEP_PIPELINE_MIN_TILES * tiles.block_n
        and kv.key_cache.dtype == q.dtype  # measured with K and V stored in q's dtype only
    ):
        deeper = replace(tiles, num_stages=deep)
        if deeper.fits(q.dtype.itemsize, kv.key_cache.dtype.itemsize, info):
            tiles = deeper
    return PagedLaunch(tiles, splits)


def merge_warps(block_d: int) -> int:
    """Warps of the split-KV merge kernel for a head of ``block_d`` columns."""
    return 4 if block_d >= 128 else 2
