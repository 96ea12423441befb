"""How much memory graphs hold: the device memory of a graph pool, or on CPU the buffers kept between replays."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from llamatelemetry_core.errors import CapabilityError
from llamatelemetry_graphs._runtime import device_index
from llamatelemetry_graphs.config import PoolHandle

__all__ = ["GraphMemoryUsage", "buffer_memory_usage", "pool_memory_usage"]

_POOL_METHOD = (
    "sum over torch.cuda.memory_snapshot() segments whose segment_pool_id is the graph pool: reserved = "
    "segment sizes, allocated = bytes in live blocks (static outputs and anything else the pool still holds)"
)
_BUFFER_METHOD = (
    "no CUDA graph pool without CUDA: bytes of the distinct output tensors kept between replays "
    "(eager emulation); reserved = allocated"
)


@dataclass(frozen=True)
class GraphMemoryUsage:
    """Memory held by one graph pool (all graphs sharing it), and how it was measured.

    ``reserved_bytes``: device memory the caching allocator has set aside for the pool; ``allocated_bytes``:
    the part in live blocks; ``segments``: number of allocator segments; ``method``: how the figures were taken.
    """

    reserved_bytes: int
    allocated_bytes: int
    segments: int
    method: str

    def __add__(self, other: GraphMemoryUsage) -> GraphMemoryUsage:
        method = self.method if self.method == other.method else f"{self.method}; {other.method}"
        return GraphMemoryUsage(
            self.reserved_bytes + other.reserved_bytes,
            self.allocated_bytes + other.allocated_bytes,
            self.segments + other.segments,
            method,
        )


def pool_memory_usage(pool: PoolHandle, device: torch.device) -> GraphMemoryUsage:
    """Device memory held by graph pool ``pool`` on ``device``, from the caching allocator's snapshot.

    Raises :class:`~llamatelemetry_core.errors.CapabilityError` when this PyTorch does not report the pool of
    each segment.
    """
    index = device_index(device)
    reserved = allocated = count = 0
    saw_pool_ids = False
    for segment in torch.cuda.memory_snapshot():  # type: ignore[no-untyped-call]
        segment_pool = segment.get("segment_pool_id")
        if segment_pool is None:
            continue
        saw_pool_ids = True
        if int(segment.get("device", index)) != index or tuple(segment_pool) != tuple(pool):
            continue
        reserved += int(segment["total_size"])
        allocated += int(segment["allocated_size"])
        count += 1
    if not saw_pool_ids and torch.cuda.memory_reserved(index) > 0:
        raise CapabilityError(
            f"expected torch.cuda.memory_snapshot() segments to carry 'segment_pool_id', got none "
            f"(torch {torch.__version__}); measure with torch.cuda.memory_reserved() deltas around the captures"
        )
    return GraphMemoryUsage(reserved, allocated, count, _POOL_METHOD)


def buffer_memory_usage(tensors: Iterable[torch.Tensor]) -> GraphMemoryUsage:
    """Bytes of the distinct storages behind ``tensors`` (each counted once however many views share it)."""
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return GraphMemoryUsage(total, total, 0, _BUFFER_METHOD)
