"""Named CUDA graphs that share one memory pool: :class:`GraphPool`.

Graphs captured into one pool reuse the memory their predecessors freed during capture (intermediates), so a
set of graphs for several shapes costs about as much as the largest one when the largest is captured first.
The price of sharing: replaying one graph may overwrite the memory another graph's outputs live in, so read or
copy a graph's outputs before replaying another graph of the same pool, and never replay two of them at once.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_graphs import _runtime
from llamatelemetry_graphs._runtime import new_pool_handle
from llamatelemetry_graphs._tree import tensor_leaves
from llamatelemetry_graphs.config import GraphCaptureConfig, PoolHandle
from llamatelemetry_graphs.graph import CUDAGraph
from llamatelemetry_graphs.memory import GraphMemoryUsage, buffer_memory_usage, pool_memory_usage

__all__ = ["GraphPool"]


class GraphPool:
    """Graphs kept by name, in capture order, sharing one memory pool. Thread-safe.

    ``capture(name, fn)`` captures ``fn`` with this pool's config into the shared pool and returns its output;
    ``replay(name, *inputs)`` replays it. ``name in pool``, ``len(pool)``, ``list_graphs()``, ``get``,
    ``remove`` and ``clear`` manage them; :meth:`memory_usage` reports the bytes the pool holds.

    Every method takes one lock, so captures and replays from several threads are serialised. A replay's
    outputs are the graph's static tensors: consume or copy them (``copy=True``) before another replay of any
    graph in this pool, from any thread.
    """

    def __init__(self, config: GraphCaptureConfig | None = None) -> None:
        if config is not None and not isinstance(config, GraphCaptureConfig):
            raise TypeError(f"expected config to be a GraphCaptureConfig or None, got {type(config).__name__}")
        self._config = config if config is not None else GraphCaptureConfig()
        self._graphs: dict[str, CUDAGraph] = {}
        self._lock = threading.RLock()
        self._pool: PoolHandle | None = self._config.pool

    @property
    def config(self) -> GraphCaptureConfig:
        return self._config

    @property
    def pool_handle(self) -> PoolHandle | None:
        """The memory pool the graphs share (``None`` without CUDA, or before the first CUDA capture)."""
        return self._pool

    def _capture_config(self) -> GraphCaptureConfig:
        # PyTorch forgets a pool once no graph captured into it is alive, and asserts if a later capture names
        # it again; so a pool of our own is renewed whenever the last graph is gone. A pool given in the config
        # belongs to the caller, who keeps a graph of it alive.
        if _runtime.cuda_available() and self._config.pool is None and (self._pool is None or not self._graphs):
            self._pool = new_pool_handle()
        return dataclasses.replace(self._config, pool=self._pool)

    # --- capture and replay ----------------------------------------------------------------------------------

    def capture(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        inputs: Sequence[torch.Tensor] | None = None,
        warmup: bool = True,
        replace: bool = False,
    ) -> Any:
        """Capture ``fn`` as graph ``name`` (see :meth:`CUDAGraph.capture`) and return its output.

        Raises ``ConfigurationError`` if ``name`` exists, unless ``replace``: then the new graph is captured
        first and the old one dropped only once that succeeded.
        """
        _check_name(name)
        with self._lock:
            old = self._graphs.get(name)
            if old is not None and not replace:
                raise ConfigurationError(
                    f"expected a new graph name, got {name!r}, which this pool already holds "
                    f"(graphs: {self._names()}); pass replace=True to recapture it, or remove({name!r}) first"
                )
            graph = CUDAGraph(self._capture_config())
            output = graph.capture(fn, inputs=inputs, warmup=warmup)
            self._graphs[name] = graph  # an existing key keeps its place in the capture order
            if old is not None:
                old.reset()
            return output

    def replay(self, name: str, *inputs: torch.Tensor | None, copy: bool = False) -> Any:
        """Replay graph ``name`` (see :meth:`CUDAGraph.replay`); ``KeyError`` listing the names if unknown."""
        with self._lock:
            return self._get(name).replay(*inputs, copy=copy)

    # --- management ------------------------------------------------------------------------------------------

    def get(self, name: str) -> CUDAGraph:
        """The graph called ``name``; ``KeyError`` listing the names if unknown."""
        with self._lock:
            return self._get(name)

    def _get(self, name: str) -> CUDAGraph:
        try:
            return self._graphs[name]
        except (KeyError, TypeError):
            raise KeyError(f"no graph named {name!r} in this pool; it holds {self._names()}") from None

    def _names(self) -> str:
        return "[" + ", ".join(repr(n) for n in self._graphs) + "]" if self._graphs else "no graphs"

    def list_graphs(self) -> list[str]:
        """The names of the graphs, in capture order (a replaced graph keeps its place)."""
        with self._lock:
            return list(self._graphs)

    def remove(self, name: str) -> None:
        """Drop graph ``name`` and its static tensors; its memory returns to the pool for later captures."""
        with self._lock:
            graph = self._get(name)
            del self._graphs[name]
            graph.reset()

    def clear(self) -> None:
        """Drop every graph. The pool's memory goes back to the device at the next ``torch.cuda.empty_cache()``."""
        with self._lock:
            graphs = list(self._graphs.values())
            self._graphs.clear()
            for graph in graphs:
                graph.reset()

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._graphs

    def __len__(self) -> int:
        with self._lock:
            return len(self._graphs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.list_graphs())

    def __repr__(self) -> str:
        with self._lock:
            return f"GraphPool({self._names()}, pool={self._pool})"

    def memory_usage(self) -> GraphMemoryUsage:
        """Bytes held by the shared pool on the GPU; without CUDA, by the graphs' output buffers.

        On a GPU the figure is the whole pool, which also counts memory a caller shares through
        ``GraphCaptureConfig(pool=...)`` with graphs outside this object.
        """
        with self._lock:
            graphs = list(self._graphs.values())
            cuda = [g for g in graphs if g.is_cuda_graph]
            if cuda and self._pool is not None:
                device = cuda[0].device
                assert device is not None
                return pool_memory_usage(self._pool, device)
            outputs: list[torch.Tensor] = []
            for graph in graphs:
                outputs.extend(tensor_leaves(graph.output))
            return buffer_memory_usage(outputs)


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"expected a graph name that is a non-empty str, got {name!r}")
