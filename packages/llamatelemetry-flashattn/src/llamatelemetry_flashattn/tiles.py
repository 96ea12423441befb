"""Tile sizes of the Triton FlashAttention kernel: one pure function shared by the launcher and the AOT provider.

A program of the kernel holds a ``BLOCK_M x BLOCK_D`` tile of queries and streams ``BLOCK_N x BLOCK_D`` tiles of
keys and values through shared memory, ``num_stages`` deep. Its shared memory is about::

    (num_stages * 2 * BLOCK_N * BLOCK_D  +  BLOCK_M * BLOCK_D  +  BLOCK_M * BLOCK_N) * element_size

(K and V stages, the Q tile, the probabilities on their way into the second matmul). The preferred tiles come
from the device class (Hopper/Ampere datacenter parts opt into 163-227 KiB per block, consumer Ampere/Ada into
99 KiB, Turing such as the T4 into 64 KiB, with tiles small enough for its FMA dots to fit the registers) and are
shrunk until the estimate fits the device; the ahead-of-time check (``python -m llamatelemetry_core.aot``) compiles
the result and confirms it with the real figure.

Rows of a tile are query rows packed with the query heads that share one key/value head (grouped-query
attention), so a decode step (one query, ``G`` heads per KV head) fills ``G`` rows: ``BLOCK_M`` then shrinks to the
rows there are (at least 16, the smallest tensor-core tile), which keeps a decode step memory-bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamatelemetry_core.device import DeviceInfo

__all__ = ["MAX_HEAD_DIM", "TileConfig", "choose_tiles", "padded_head_dim"]

MAX_HEAD_DIM = 256
_MIN_TILE = 16


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration of the Triton attention kernel."""

    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int

    def shared_memory_estimate(self, element_size: int) -> int:
        """Bytes of shared memory the kernel is expected to need (see the module docstring)."""
        kv = self.num_stages * 2 * self.block_n * self.block_d
        return (kv + self.block_m * self.block_d + self.block_m * self.block_n) * element_size


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def padded_head_dim(head_dim: int) -> int:
    """The power-of-two tile width covering ``head_dim`` (at least 16); extra columns are masked."""
    return max(_MIN_TILE, _next_pow2(head_dim))


def _preferred(block_d: int, device: DeviceInfo) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) before fitting, by device class and head width."""
    smem = device.shared_memory_per_block_bytes or 0
    big = device.capability_at_least(8, 0) and smem >= 160 * 1024  # A100, H100, H200, B200
    if not device.capability_at_least(8, 0):
        # Turing and older: no cp.async, 64 KiB, and Triton (3.6 to 3.9) emits no mma.sync for sm_75, so the
        # dots run on FMA units with their operands in registers. Compiled for sm_75, 64x32 tiles at d=128 in 4
        # warps spilled 58 KB per thread; these are the largest tiles that compile with no spills (16 bytes at
        # d=128), from a sweep of 16/32/64 x 16/32/64 in 4 and 8 warps. Not timed on a T4.
        return (32, 32, 4, 2) if block_d <= 64 else (32, 32, 8, 2) if block_d <= 128 else (16, 16, 8, 1)
    if block_d <= 64:  # measured on an H100: 64x64 with 4 warps beats 128x64 (4 or 8 warps) and 128x128
        return (64, 64, 4, 3)
    if block_d <= 128:
        return (128, 64, 8, 3 if big else 2)
    return (64, 64, 8, 2) if big else (64, 32, 4, 2)


def choose_tiles(
    head_dim: int, dtype: torch.dtype, device: DeviceInfo, *, rows_per_program: int | None = None
) -> TileConfig:
    """The tiles the kernel uses for ``head_dim`` and ``dtype`` on ``device``.

    ``rows_per_program`` is the number of packed query rows one (batch, KV head) has, ``q_len * H / H_kv``;
    ``None`` means "many" (prefill). A CPU device (the Triton interpreter) gets small tiles: they are exact
    everywhere and the interpreter's time grows with tile size.
    """
    if not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"expected 0 < head_dim <= {MAX_HEAD_DIM}, got {head_dim}")
    block_d = padded_head_dim(head_dim)
    element_size = dtype.itemsize
    if not device.is_cuda:
        block_m = 16 if rows_per_program is None else max(_MIN_TILE, min(32, _next_pow2(rows_per_program)))
        return TileConfig(block_m, 16, block_d, 4, 1)
    block_m, block_n, warps, stages = _preferred(block_d, device)
    if rows_per_program is not None and rows_per_program < block_m:
        # Decode-like calls: no more rows than there are; fewer warps suffice for the small tile (on Turing the
        # FMA dots keep the warps that hold their operands without spilling).
        block_m = max(_MIN_TILE, _next_pow2(rows_per_program))
        if device.capability_at_least(8, 0):
            warps = 4
    limit = device.shared_memory_per_block_bytes or 48 * 1024
    config = TileConfig(block_m, block_n, block_d, warps, stages)
    while config.shared_memory_estimate(element_size) > limit:
        if config.num_stages > 2 or (config.num_stages > 1 and config.block_n <= 32):
            config = TileConfig(config.block_m, config.block_n, block_d, config.num_warps, config.num_stages - 1)
        elif config.block_n > 32:
            config = TileConfig(config.block_m, config.block_n // 2, block_d, config.num_warps, config.num_stages)
        elif config.block_m > _MIN_TILE:
            config = TileConfig(config.block_m // 2, config.block_n, block_d, config.num_warps, config.num_stages)
        elif config.block_n > _MIN_TILE:
            config = TileConfig(config.block_m, config.block_n // 2, block_d, config.num_warps, config.num_stages)
        else:
            break
    return config
