"""llamatelemetry-graphs: CUDA graph capture and replay, graph pools and batch-size buckets.

Documented import path: ``llamatelemetry.cuda.graphs``.

* :class:`CUDAGraph`, :func:`capture_graph`, :func:`replay_graph`: capture once, replay many times;
* :class:`GraphCaptureConfig`: warm-up count, shared pool, capture error mode, stream;
* :class:`GraphPool`: graphs by name sharing one memory pool;
* :class:`BatchBucketedGraphs`: one graph per batch size, with padding, for decode steps;
* :func:`enable_cuda_graphs`: a module wrapper with one graph per input signature;
* :class:`GraphCaptureError`: what broke a capture, and how to fix it.

Without CUDA every call still works: captures record the callable and replays re-run it eagerly
(:attr:`CUDAGraph.is_cuda_graph` is then False).
"""

from llamatelemetry_graphs.__about__ import __version__
from llamatelemetry_graphs._tree import clone_outputs
from llamatelemetry_graphs.buckets import BatchBucketedGraphs, default_batch_buckets
from llamatelemetry_graphs.config import GraphCaptureConfig
from llamatelemetry_graphs.errors import CAPTURE_RULES, CaptureRule, GraphCaptureError, GraphInputError, GraphStateError
from llamatelemetry_graphs.graph import CaptureScope, CUDAGraph, capture_graph, replay_graph
from llamatelemetry_graphs.memory import GraphMemoryUsage
from llamatelemetry_graphs.module import GraphedModule, GraphedModuleStats, enable_cuda_graphs
from llamatelemetry_graphs.pool import GraphPool

__all__ = [
    "CAPTURE_RULES",
    "BatchBucketedGraphs",
    "CUDAGraph",
    "CaptureRule",
    "CaptureScope",
    "GraphCaptureConfig",
    "GraphCaptureError",
    "GraphInputError",
    "GraphMemoryUsage",
    "GraphPool",
    "GraphStateError",
    "GraphedModule",
    "GraphedModuleStats",
    "__version__",
    "capture_graph",
    "clone_outputs",
    "default_batch_buckets",
    "enable_cuda_graphs",
    "replay_graph",
]
