"""Which CUDA graph the current thread is capturing into.

Kernels that keep state between launches (the split-K counts of ``llamatelemetry-triton``'s small-M linear, kept
zero by the launches themselves) give each captured graph its own copy, and need to know which graph a launch
is being recorded into. Newer PyTorch releases say so (``torch.cuda.CUDAGraph.get_currently_capturing_graph``:
2.13 has it, 2.11 does not), so a capture made by ``llamatelemetry-graphs`` declares its graph here
(:func:`declare_capture`) for the duration of the capture, whatever the release.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator

import torch

__all__ = ["capturing_graph", "declare_capture"]

_declared: contextvars.ContextVar[object | None] = contextvars.ContextVar("llamatelemetry_capture", default=None)


@contextlib.contextmanager
def declare_capture(graph: object) -> Iterator[None]:
    """Within the block, :func:`capturing_graph` answers ``graph`` (the ``torch.cuda.CUDAGraph`` being captured
    on this thread)."""
    token = _declared.set(graph)
    try:
        yield
    finally:
        _declared.reset(token)


def capturing_graph() -> object | None:
    """The CUDA graph the current stream is capturing into, as an object that can be weakly referenced (its
    lifetime is the graph's); ``None`` when the stream is not capturing, or when neither a declared capture nor
    this torch release can say which graph it is."""
    if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
        return None
    declared = _declared.get()
    if declared is not None:
        return declared
    current = getattr(torch.cuda.CUDAGraph, "get_currently_capturing_graph", None)
    if current is None:
        return None
    try:
        graph: object = current()
        weakref.ref(graph)
    except (RuntimeError, TypeError):
        return None
    return graph
