"""The CUDA side of a capture: side streams, pool handles, and a capture that cleans up after itself.

PyTorch's ``torch.cuda.graph`` context manager ends the capture and restores the stream in ``__exit__``; when the
captured code broke a rule, ``capture_end`` raises before the stream is restored and before the caching allocator
is told the capture is over, and the next ``torch.cuda.empty_cache()`` then trips an internal assert. The capture
here drives ``torch.cuda.CUDAGraph.capture_begin``/``capture_end`` itself so that every exit path restores the
stream, undoes the allocator bookkeeping of a failed capture, and explains the broken rule.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any, cast

import torch

from llamatelemetry_core.capture import declare_capture
from llamatelemetry_graphs.config import CaptureErrorMode, PoolHandle
from llamatelemetry_graphs.errors import capture_error, explain_capture_error

__all__ = [
    "capture_lock",
    "capturing_in_this_thread",
    "cuda_available",
    "device_index",
    "marking_capture",
    "new_pool_handle",
    "recording",
    "side_stream",
]

# PyTorch allows one capture at a time per process (in "global" mode any other thread's unsafe call breaks it),
# so every capture of this package takes this lock. Replays do not.
capture_lock = threading.Lock()
_streams_lock = threading.Lock()
_side_streams: dict[int, torch.cuda.Stream] = {}
_thread = threading.local()


def cuda_available() -> bool:
    """Whether real CUDA graphs can be captured here.

    Deliberately the real device, not ``llamatelemetry_core``'s simulated one: simulating a GPU changes what is
    chosen, but a capture needs the hardware. Tests monkeypatch this to exercise both branches.
    """
    return torch.cuda.is_available()


def device_index(device: torch.device) -> int:
    """The CUDA index of ``device``; the current device for a bare ``cuda``."""
    index = cast("int | None", device.index)  # None for torch.device("cuda"), whatever the stubs say
    return torch.cuda.current_device() if index is None else index


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream this package warms up and captures on for ``device`` (created on first use).

    One stream per device for every capture: the caching allocator reuses a pool's freed blocks only within
    the stream that allocated them, so graphs sharing a pool must also share the capture stream.
    """
    index = device_index(device)
    with _streams_lock:
        stream = _side_streams.get(index)
        if stream is None:
            stream = torch.cuda.Stream(device=index)  # type: ignore[no-untyped-call]
            _side_streams[index] = stream
        return stream


def new_pool_handle() -> PoolHandle:
    """A fresh graph memory pool id (``torch.cuda.graph_pool_handle()`` as a plain tuple)."""
    first, second = torch.cuda.graph_pool_handle()
    return (int(first), int(second))


def capturing_in_this_thread() -> bool:
    """Whether this thread is inside a capture of this package (a real one, or its eager emulation)."""
    return bool(getattr(_thread, "capturing", False))


@contextlib.contextmanager
def marking_capture() -> Iterator[None]:
    """Mark this thread as capturing for the block; raise the nested-capture error if it already is."""
    if capturing_in_this_thread() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
        raise capture_error("nested-capture")
    _thread.capturing = True
    try:
        yield
    finally:
        _thread.capturing = False


def _undo_failed_capture(device_index: int, pool: PoolHandle) -> None:
    """Undo what ``capture_begin`` told the caching allocator, after a capture that did not end cleanly.

    ``capture_begin`` routes the capture's allocations to ``pool`` and takes a reference on it; a successful
    ``capture_end`` stops the routing, and the graph's destructor drops the reference. After a failed
    ``capture_end`` neither happens, so both are done here, once, with the same private bindings PyTorch's own
    ``torch.cuda.use_mem_pool`` uses (renamed in torch 2.8; both names are tried).
    """
    end = getattr(torch._C, "_cuda_endAllocateToPool", None) or getattr(
        torch._C, "_cuda_endAllocateCurrentStreamToPool", None
    )
    release = getattr(torch._C, "_cuda_releasePool", None)
    if end is None or release is None:  # pragma: no cover - depends on the torch build
        return
    try:
        end(device_index, pool)
    except RuntimeError:
        return  # the allocator was not routing to this pool: capture_begin failed before it, nothing to undo
    release(device_index, pool)


@contextlib.contextmanager
def recording(
    graph: torch.cuda.CUDAGraph,
    *,
    device: torch.device,
    stream: torch.cuda.Stream,
    pool: PoolHandle,
    capture_error_mode: CaptureErrorMode,
) -> Iterator[None]:
    """Record the CUDA work issued inside the block into ``graph``, on ``stream``, allocating from ``pool``.

    On exit the capture is ended, the caller's stream is made to wait on ``stream``, and the current stream and
    device are restored, whatever happened inside. An error that breaks a capture rule is re-raised as a
    :class:`~llamatelemetry_graphs.errors.GraphCaptureError`; any other error is re-raised unchanged.
    """
    with marking_capture(), capture_lock, torch.cuda.device(device), declare_capture(graph):
        index = torch.cuda.current_device()
        # Pending work on other streams must not become part of (or race with) the capture.
        torch.cuda.synchronize()
        ended = False
        try:
            with torch.cuda.stream(stream):
                # torch types the handle as its own NewType of tuple[int, int] (name varies by release).
                graph.capture_begin(pool=cast(Any, pool), capture_error_mode=capture_error_mode)
                try:
                    yield
                except BaseException:
                    # End the (probably invalidated) capture; its own error is a consequence of this one.
                    with contextlib.suppress(RuntimeError):
                        graph.capture_end()
                        ended = True
                    raise
                graph.capture_end()
                ended = True
        except BaseException as exc:
            if not ended:
                _undo_failed_capture(index, pool)
            explained = explain_capture_error(exc) if isinstance(exc, RuntimeError) else None
            if explained is not None and explained is not exc:
                raise explained from exc
            raise
        torch.cuda.current_stream().wait_stream(stream)
