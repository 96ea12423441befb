"""A module that captures one CUDA graph per input signature and replays it: :func:`enable_cuda_graphs`.

The first call with a new signature (the shapes, dtypes and devices of the tensor arguments, the values of the
other arguments, and the module's training flag) runs the module eagerly on the caller's tensors (its result is
returned), then warms up and captures a graph into a pool shared by all of the module's graphs; later calls with
that signature copy their tensors into the graph's static inputs and replay it.

In-place updates are kept exactly as eager calls make them. The first call records what the module writes
(:mod:`llamatelemetry_graphs._writes`): an input it updates in place (a KV cache, ``cache.index_copy_(...)``)
is copied back to the caller's tensor after every replay, and parameters or buffers it updates (BatchNorm's
running statistics in training mode) are restored after warm-up and capture, which would otherwise have
repeated the update, from a temporary copy; each replay then updates them once, as an eager call does.

Calls that must not be captured run the module eagerly:

* autograd would record (grad mode on and an input or parameter requires grad): a replay records no history;
* a tensor is not on CUDA while CUDA is available, or tensors span devices;
* an argument is unhashable, so no signature can stand for it;
* the wrapper already holds ``max_graphs`` graphs (it never evicts: capturing costs far more than a replay);
* the call happens inside another capture (the outer capture then records the eager work).

Without CUDA every call is served by the eager emulation of :class:`~llamatelemetry_graphs.graph.CUDAGraph`,
with the same signatures, bound and output semantics; it is slower than calling the module directly.

A graph reads the parameters' memory in place: updating weights in place (``load_state_dict``,
``param.copy_``) is seen by later replays, but *replacing* a parameter tensor is not; call :meth:`reset`.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from llamatelemetry_core.validation import check_positive_int
from llamatelemetry_graphs import _runtime
from llamatelemetry_graphs._runtime import capturing_in_this_thread
from llamatelemetry_graphs._tree import clone_outputs, replace_tensors, signature, tensor_leaves
from llamatelemetry_graphs._writes import record_writes
from llamatelemetry_graphs.config import GraphCaptureConfig
from llamatelemetry_graphs.graph import CUDAGraph
from llamatelemetry_graphs.memory import GraphMemoryUsage
from llamatelemetry_graphs.pool import GraphPool

__all__ = ["GraphedModule", "GraphedModuleStats", "enable_cuda_graphs"]


@dataclass
class GraphedModuleStats:
    """What a :class:`GraphedModule` did: captures, replays, and eager calls by reason."""

    captures: int = 0
    replays: int = 0
    eager_calls: dict[str, int] = field(default_factory=dict)

    def count_eager(self, reason: str) -> None:
        self.eager_calls[reason] = self.eager_calls.get(reason, 0) + 1


class GraphedModule(torch.nn.Module):
    """``module`` behind per-signature CUDA graphs; see :func:`enable_cuda_graphs`.

    The wrapped module is the submodule ``module`` (so state-dict keys gain a ``module.`` prefix).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        max_graphs: int = 8,
        config: GraphCaptureConfig | None = None,
        copy_outputs: bool = True,
    ) -> None:
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"expected a torch.nn.Module to wrap, got {type(module).__name__}")
        super().__init__()
        self.module = module
        self.max_graphs = check_positive_int(max_graphs, "max_graphs")
        self.copy_outputs = bool(copy_outputs)
        self._graph_pool = GraphPool(config)
        self._graphs: dict[Hashable, CUDAGraph] = {}
        self._written_inputs: dict[Hashable, tuple[int, ...]] = {}
        self._lock = threading.RLock()
        self.stats = GraphedModuleStats()

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def signatures(self) -> list[Hashable]:
        """The signatures with a graph, in capture order."""
        with self._lock:
            return list(self._graphs)

    def reset(self) -> None:
        """Drop every graph (for example after replacing parameter tensors); they are recaptured on demand."""
        with self._lock:
            self._graphs.clear()
            self._written_inputs.clear()
            self._graph_pool.clear()

    def memory_usage(self) -> GraphMemoryUsage:
        """Memory held by the graphs' shared pool."""
        return self._graph_pool.memory_usage()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``module(*args, **kwargs)``, replayed from a graph when the call may be captured.

        Returns clones of the graph's outputs when ``copy_outputs`` (default), else the static outputs, which
        the next call with any signature may overwrite.
        """
        call = (args, dict(sorted(kwargs.items())))
        tensors = tensor_leaves(call)
        reason = self._eager_reason(tensors)
        key: Hashable | None = None
        if reason is None:
            key = signature(call)
            if key is None:
                reason = "unhashable argument"
        if reason is not None or key is None:
            self.stats.count_eager(reason or "unhashable argument")
            return self.module(*args, **kwargs)
        key = (self.module.training, key)
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                if len(self._graphs) >= self.max_graphs:
                    self.stats.count_eager("graph limit reached")
                    return self.module(*args, **kwargs)
                return self._capture(key, call, tensors)  # the eager result, already the caller's
            output = graph.replay(*tensors)
            self._copy_back(graph, tensors, self._written_inputs[key])
            self.stats.replays += 1
            return clone_outputs(output) if self.copy_outputs else output

    @staticmethod
    def _copy_back(graph: CUDAGraph, tensors: list[torch.Tensor], written: tuple[int, ...]) -> None:
        """Write what the replay wrote into its static inputs back to the caller's tensors."""
        for i in written:
            target, source = tensors[i], graph.inputs[i]
            if target is source:
                continue
            with torch.inference_mode() if target.is_inference() else torch.no_grad():
                target.copy_(source)

    def _eager_reason(self, tensors: list[torch.Tensor]) -> str | None:
        if capturing_in_this_thread():
            return "inside another capture"
        if torch.is_grad_enabled() and (
            any(t.requires_grad for t in tensors) or any(p.requires_grad for p in self.module.parameters())
        ):
            return "requires grad"
        if len({t.device for t in tensors}) > 1:
            return "tensors on several devices"
        if tensors and tensors[0].device.type != "cuda" and _runtime.cuda_available():
            return "cpu tensor"
        return None

    def _capture(self, key: Hashable, call: tuple[tuple[Any, ...], dict[str, Any]], tensors: list[torch.Tensor]) -> Any:
        with torch.no_grad():
            static = [t.clone() for t in tensors]  # the values before the call, and the graph's static inputs
        args, kwargs = call
        with record_writes(self.module, tensors, static) as writes:
            output = self.module(*args, **kwargs)  # the call itself, once, on the caller's tensors
        with torch.no_grad():
            saved = [t.detach().clone() for t in writes.state_tensors]

        def run(*inputs: torch.Tensor) -> Any:
            replay_args, replay_kwargs = replace_tensors(call, iter(inputs))
            return self.module(*replay_args, **replay_kwargs)

        name = f"signature_{self.stats.captures}"
        try:
            self._graph_pool.capture(name, run, inputs=static)
        finally:
            # Warm-up and capture ran the module again: undo their updates of its state.
            for target, value in zip(writes.state_tensors, saved, strict=True):
                with torch.inference_mode() if target.is_inference() else torch.no_grad():
                    target.copy_(value)
        graph = self._graph_pool.get(name)
        self._graphs[key] = graph
        self._written_inputs[key] = writes.inputs
        self.stats.captures += 1
        if self.copy_outputs:
            return output
        # The caller asked for the static outputs: put this call's result there, as a replay would have.
        static_out, fresh = tensor_leaves(graph.output), tensor_leaves(output)
        if len(static_out) == len(fresh) and all(
            a.shape == b.shape and a.dtype == b.dtype for a, b in zip(static_out, fresh, strict=True)
        ):
            for target, value in zip(static_out, fresh, strict=True):
                with torch.inference_mode() if target.is_inference() else torch.no_grad():
                    target.copy_(value)
            return graph.output
        return output


def enable_cuda_graphs(
    model: torch.nn.Module,
    *,
    max_graphs: int = 8,
    config: GraphCaptureConfig | None = None,
    copy_outputs: bool = True,
) -> GraphedModule:
    """Wrap ``model`` so that each input signature is captured once as a CUDA graph and replayed afterwards.

    Args:
        model: the module; put it in ``eval()`` mode and call it under ``torch.inference_mode()`` (or with no
            parameter requiring grad), or every call runs eagerly.
        max_graphs: the most graphs kept; calls with further signatures run eagerly.
        config: capture settings (warm-up count, error mode, stream).
        copy_outputs: return clones (default, safe to keep) or the graphs' static outputs (one copy fewer;
            the next call overwrites them).

    Returns a :class:`GraphedModule`; its ``stats`` count captures, replays and eager calls by reason.
    """
    return GraphedModule(model, max_graphs=max_graphs, config=config, copy_outputs=copy_outputs)
