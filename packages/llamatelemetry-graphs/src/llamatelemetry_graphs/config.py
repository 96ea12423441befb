"""How a CUDA graph is captured: warm-up count, shared memory pool, capture error mode, capture stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias, get_args

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import check_in, check_non_negative_int

__all__ = ["CAPTURE_ERROR_MODES", "CaptureErrorMode", "GraphCaptureConfig", "PoolHandle"]

CaptureErrorMode: TypeAlias = Literal["global", "thread_local", "relaxed"]
CAPTURE_ERROR_MODES: tuple[str, ...] = get_args(CaptureErrorMode)

PoolHandle: TypeAlias = tuple[int, int]
"""A graph memory pool id: what ``torch.cuda.graph_pool_handle()`` and ``torch.cuda.CUDAGraph.pool()`` return."""


@dataclass(frozen=True)
class GraphCaptureConfig:
    """Settings of a capture. Every value is checked here, so a bad one fails before any GPU work.

    Attributes:
        warmup_iters: how many times ``capture(fn, warmup=True)`` runs ``fn`` eagerly on the capture stream
            before recording it. Warm-up lets lazy initialisation (cuBLAS workspaces, autotuning, allocator
            growth) happen outside the graph, where it is allowed. PyTorch's notes use 3; >= 0.
        pool: a graph memory pool to share with other graphs (``torch.cuda.graph_pool_handle()``,
            ``torch.cuda.CUDAGraph.pool()``, :attr:`CUDAGraph.pool_handle`, :attr:`GraphPool.pool_handle`).
            Graphs captured into one pool reuse each other's freed intermediates, so their memory is about that
            of the largest one; the price is that replaying one may overwrite another's outputs, and they must
            not run concurrently. ``None``: the graph gets a private pool.
        capture_error_mode: the ``cudaStreamCaptureMode`` passed to PyTorch. ``"global"`` (default) fails any
            unsafe CUDA call from any thread during the capture; ``"thread_local"`` only from the capturing
            thread; ``"relaxed"`` fails none (use only when you know the unsafe calls are harmless).
        stream: the side stream to warm up and capture on. ``None``: one side stream per device, shared by all
            captures of this package, so graphs sharing a pool also share the stream (the caching allocator
            only reuses pool memory within one stream). Must not be the default stream.
    """

    warmup_iters: int = 3
    pool: PoolHandle | None = None
    capture_error_mode: CaptureErrorMode = "global"
    stream: torch.cuda.Stream | None = None

    def __post_init__(self) -> None:
        check_non_negative_int(self.warmup_iters, "GraphCaptureConfig.warmup_iters")
        check_in(self.capture_error_mode, CAPTURE_ERROR_MODES, "GraphCaptureConfig.capture_error_mode")
        if self.pool is not None:
            _check_pool_handle(self.pool)
        if self.stream is not None:
            _check_stream(self.stream)


def _check_pool_handle(pool: object) -> None:
    ok = (
        isinstance(pool, tuple)
        and len(pool) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pool)
        and pool != (0, 0)
    )
    if not ok:
        raise ConfigurationError(
            f"expected GraphCaptureConfig.pool to be a graph memory pool handle (a pair of non-negative ints, not "
            f"(0, 0)) or None, got {pool!r}; get one from torch.cuda.graph_pool_handle(), another graph's "
            f"pool_handle, or GraphPool().pool_handle"
        )


def _check_stream(stream: object) -> None:
    if not isinstance(stream, torch.cuda.Stream):
        raise ConfigurationError(
            f"expected GraphCaptureConfig.stream to be a torch.cuda.Stream or None, got {type(stream).__name__}; "
            f"create one with torch.cuda.Stream() or leave it None for a side stream per device"
        )
    if stream == torch.cuda.default_stream(stream.device):
        raise ConfigurationError(
            f"expected GraphCaptureConfig.stream to be a side stream, got the default stream of {stream.device}; "
            f"CUDA graphs cannot be captured on the default stream: pass torch.cuda.Stream() or None"
        )
