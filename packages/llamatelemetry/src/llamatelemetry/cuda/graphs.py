"""CUDA graph capture and replay (``pip install "llamatelemetry[graphs]"``): re-exports ``llamatelemetry_graphs``."""

from llamatelemetry._components import missing_component
from llamatelemetry._components import reexported as _reexported

try:
    from llamatelemetry_graphs import BatchBucketedGraphs as BatchBucketedGraphs
    from llamatelemetry_graphs import CaptureScope as CaptureScope
    from llamatelemetry_graphs import CUDAGraph as CUDAGraph
    from llamatelemetry_graphs import GraphCaptureConfig as GraphCaptureConfig
    from llamatelemetry_graphs import GraphCaptureError as GraphCaptureError
    from llamatelemetry_graphs import GraphedModule as GraphedModule
    from llamatelemetry_graphs import GraphInputError as GraphInputError
    from llamatelemetry_graphs import GraphMemoryUsage as GraphMemoryUsage
    from llamatelemetry_graphs import GraphPool as GraphPool
    from llamatelemetry_graphs import GraphStateError as GraphStateError
    from llamatelemetry_graphs import capture_graph as capture_graph
    from llamatelemetry_graphs import clone_outputs as clone_outputs
    from llamatelemetry_graphs import default_batch_buckets as default_batch_buckets
    from llamatelemetry_graphs import enable_cuda_graphs as enable_cuda_graphs
    from llamatelemetry_graphs import replay_graph as replay_graph
except ImportError as exc:
    raise missing_component("graphs", exc) from exc

__all__ = _reexported("graphs", globals())
del _reexported
