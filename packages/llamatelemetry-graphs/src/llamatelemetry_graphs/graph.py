"""Capture GPU work once, replay it many times: :class:`CUDAGraph`, :func:`capture_graph`, :func:`replay_graph`.

A CUDA graph records the kernels a piece of code launches on one stream, with the exact memory addresses they
read and write, and replays them with one launch. The addresses are fixed, so a graph has *static* inputs (the
tensors it read during capture: put new data into them to replay on new data) and *static* outputs (the
tensors it wrote: every replay overwrites them). See PyTorch's "CUDA Graphs" notes.

Without CUDA the same API runs eagerly: ``capture(fn)`` records the callable and ``replay`` calls it again,
after copying new inputs into the static input tensors and then copying the results into the static output
tensors, so the aliasing a program sees is the same as on a GPU. :attr:`CUDAGraph.is_cuda_graph` says which
one is behind a graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar, overload

import torch

from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_core.validation import dtype_name, format_shape
from llamatelemetry_graphs import _runtime
from llamatelemetry_graphs._runtime import (
    capturing_in_this_thread,
    marking_capture,
    new_pool_handle,
    recording,
    side_stream,
)
from llamatelemetry_graphs._tree import as_tensor_tuple, clone_outputs, tensor_leaves
from llamatelemetry_graphs.config import GraphCaptureConfig, PoolHandle
from llamatelemetry_graphs.errors import GraphInputError, GraphStateError, capture_error
from llamatelemetry_graphs.memory import GraphMemoryUsage, buffer_memory_usage, pool_memory_usage

__all__ = ["CUDAGraph", "CaptureScope", "capture_graph", "replay_graph"]

T = TypeVar("T")
_State = Literal["empty", "capturing", "cuda", "emulated", "eager-block"]


class CaptureScope:
    """What ``with graph.capture() as scope:`` yields: tell the graph which value its replays return.

    ``output = scope.set_output(model(x))`` inside the block makes ``graph.replay()`` return ``output`` (the
    same static tensors, refreshed by each replay). Without it, the one variable the block bound to tensors
    (``output = model(x)``, as the guide writes it) is the output; a block that binds several returns ``None``
    from ``replay()`` and its tensors are read directly.
    """

    __slots__ = ("_output",)

    def __init__(self) -> None:
        self._output: Any = None

    def set_output(self, value: T) -> T:
        """Record ``value`` as the block's output and return it unchanged."""
        self._output = value
        return value

    @property
    def output(self) -> Any:
        return self._output


class _BlockCapture(contextlib.AbstractContextManager[CaptureScope]):
    """The ``with graph.capture():`` form, which finds the block's output by itself.

    Written as in the guide, ``with graph.capture(): output = model(x)`` never hands ``output`` to the graph.
    The variables of the frame running the ``with`` statement are compared before and after the block: when
    exactly one name was bound to a new value holding tensors, that value is the block's output and
    ``replay()`` returns it. With several (or none), ``replay()`` returns ``None`` unless the block called
    ``scope.set_output(...)``, which always wins. Nothing is guessed from the computation itself.
    """

    def __init__(self, inner: contextlib.AbstractContextManager[CaptureScope]) -> None:
        self._inner = inner
        self._scope: CaptureScope | None = None
        self._before: dict[str, int] = {}

    def __enter__(self) -> CaptureScope:
        self._before = {name: id(value) for name, value in sys._getframe(1).f_locals.items()}
        self._scope = self._inner.__enter__()
        return self._scope

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        if exc_type is None and self._scope is not None and self._scope.output is None:
            bound = [
                value
                for name, value in sys._getframe(1).f_locals.items()
                if self._before.get(name) != id(value) and tensor_leaves(value)
            ]
            if len(bound) == 1:
                self._scope.set_output(bound[0])
        return self._inner.__exit__(exc_type, exc, tb)


class CUDAGraph:
    """One captured piece of GPU work and its static input and output tensors.

    Two ways to capture:

    * ``with graph.capture(): output = model(x)`` records the block. Warm-up is yours to do beforehand. After
      the block the graph has been replayed once, so ``output`` holds the block's result as if it ran eagerly.
    * ``output = graph.capture(fn, warmup=True)`` runs ``fn`` ``config.warmup_iters`` times on the capture
      stream, records one call, replays it once and returns its output. With ``inputs=(x, ...)`` the graph
      calls ``fn(*inputs)`` and ``replay(new_x, ...)`` copies new data into those tensors first.

    Outputs alias static buffers: every ``replay`` overwrites the tensors it returns (and, in a shared pool,
    possibly other graphs' outputs). Use ``replay(copy=True)`` or :func:`clone_outputs` to keep a result.
    Capture under ``torch.inference_mode()``/``torch.no_grad()``: a replay does not record autograd history.

    Not thread-safe: use :class:`~llamatelemetry_graphs.pool.GraphPool` to share graphs between threads.
    """

    def __init__(self, config: GraphCaptureConfig | None = None) -> None:
        if config is not None and not isinstance(config, GraphCaptureConfig):
            raise TypeError(f"expected config to be a GraphCaptureConfig or None, got {type(config).__name__}")
        self._config = config if config is not None else GraphCaptureConfig()
        self._state: _State = "empty"
        self._graph: torch.cuda.CUDAGraph | None = None
        self._call: Callable[[], Any] | None = None
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._output: Any = None
        self._output_tensors: list[torch.Tensor] = []
        self._pool: PoolHandle | None = None
        self._device: torch.device | None = None
        self._guard_copies = False
        self._captured_in_inference = False

    # --- what the graph is -------------------------------------------------------------------------------

    @property
    def config(self) -> GraphCaptureConfig:
        return self._config

    @property
    def is_captured(self) -> bool:
        """True once a capture finished (a real graph, an eager emulation, or a CPU block)."""
        return self._state in ("cuda", "emulated", "eager-block")

    @property
    def is_cuda_graph(self) -> bool:
        """True when a real CUDA graph is behind this object; False for the eager emulation without CUDA."""
        return self._state == "cuda"

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        """The static input tensors (those passed as ``inputs=`` to ``capture``); replays read them in place."""
        return self._inputs

    @property
    def output(self) -> Any:
        """The static output (what ``replay`` returns); overwritten by every replay."""
        return self._output

    @property
    def pool_handle(self) -> PoolHandle | None:
        """The memory pool the graph was captured into; pass it to ``GraphCaptureConfig(pool=...)`` to share it.

        ``None`` before a CUDA capture and without CUDA.
        """
        return self._pool

    @property
    def device(self) -> torch.device | None:
        """The CUDA device the graph runs on; ``None`` before a CUDA capture and without CUDA."""
        return self._device

    def memory_usage(self) -> GraphMemoryUsage:
        """Memory held by this graph's pool (with every graph sharing it); on CPU, by its output buffers."""
        if self._state == "cuda":
            assert self._pool is not None and self._device is not None
            return pool_memory_usage(self._pool, self._device)
        return buffer_memory_usage(self._output_tensors)

    def __repr__(self) -> str:
        kind = {"cuda": "cuda graph", "emulated": "eager emulation", "eager-block": "cpu block"}.get(
            self._state, self._state
        )
        return f"CUDAGraph({kind}, inputs={len(self._inputs)}, outputs={len(self._output_tensors)})"

    # --- capture -------------------------------------------------------------------------------------------

    @overload
    def capture(
        self, fn: None = None, *, inputs: Sequence[torch.Tensor] | None = None, warmup: bool | None = None
    ) -> contextlib.AbstractContextManager[CaptureScope]: ...

    @overload
    def capture(
        self, fn: Callable[..., T], *, inputs: Sequence[torch.Tensor] | None = None, warmup: bool | None = None
    ) -> T: ...

    def capture(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        inputs: Sequence[torch.Tensor] | None = None,
        warmup: bool | None = None,
    ) -> Any:
        """Capture ``fn`` (returns its output) or, without ``fn``, the ``with`` block (yields a :class:`CaptureScope`).

        Args:
            fn: called as ``fn(*inputs)`` (``fn()`` without ``inputs``). Its output may be a tensor or any
                nesting of tuples, lists and dicts; ``replay`` returns the same structure. Non-tensor values in it
                are frozen at capture.
            inputs: the static input tensors: they stay the caller's tensors (no copy), the graph reads them in
                place, and ``replay(*new_inputs)`` copies into them. On a GPU they must be CUDA tensors.
            warmup: run ``config.warmup_iters`` eager calls before recording. Default: True with ``fn``; the
                block form cannot warm up (do it before the block), so ``warmup=True`` there is an error.

        Raises:
            GraphStateError: already captured (call :meth:`reset` first), or called inside a capture.
            GraphCaptureError: the captured work broke a capture rule; the message names it and the fix.
            GraphInputError, TypeError: ``inputs`` are not tensors on one device.
        """
        self._check_can_capture()
        static = _check_static_inputs(inputs)
        if fn is None:
            if warmup:
                raise ConfigurationError(
                    "expected warmup=None or False for the `with graph.capture():` form, got True: a block cannot "
                    "be run before it is captured; run it once yourself before the block, or pass a callable: "
                    "graph.capture(fn, warmup=True)"
                )
            return _BlockCapture(self._capture_block(static))
        if not callable(fn):
            raise TypeError(f"expected fn to be callable or None, got {type(fn).__name__}")
        return self._capture_callable(fn, static, warmup=True if warmup is None else bool(warmup))

    def _check_can_capture(self) -> None:
        if capturing_in_this_thread():
            raise capture_error("nested-capture")
        if self._state == "capturing":
            raise GraphStateError("this CUDAGraph is being captured; finish the `with graph.capture():` block first")
        if self._state != "empty":
            raise GraphStateError(
                "this CUDAGraph already holds a capture; call graph.reset() to capture again, or create a new "
                "CUDAGraph (a GraphPool keeps several by name)"
            )

    def _capture_device(self, static: tuple[torch.Tensor, ...]) -> torch.device:
        stream = self._config.stream
        for i, tensor in enumerate(static):
            if tensor.device.type != "cuda":
                raise capture_error("cpu-tensor", f"inputs[{i}] is on {tensor.device}")
        device = static[0].device if static else None
        if stream is not None:
            if device is not None and device != stream.device:
                raise ConfigurationError(
                    f"expected the inputs on the capture stream's device {stream.device}, got {device}; move the "
                    f"inputs or pass a stream of {device} in GraphCaptureConfig"
                )
            device = stream.device
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _capture_callable(self, fn: Callable[..., Any], static: tuple[torch.Tensor, ...], *, warmup: bool) -> Any:
        call: Callable[[], Any] = (lambda: fn(*static)) if static else fn
        iters = self._config.warmup_iters if warmup else 0
        if not _runtime.cuda_available():
            with marking_capture():
                for _ in range(iters):
                    call()
                output = call()
            self._captured_in_inference = torch.is_inference_mode_enabled()
            self._finish(state="emulated", output=output, inputs=static, call=call)
            return output
        device = self._capture_device(static)
        stream = self._config.stream if self._config.stream is not None else side_stream(device)
        if iters:
            with torch.cuda.device(device):
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(iters):
                        call()
                torch.cuda.current_stream().wait_stream(stream)
        pool = self._config.pool if self._config.pool is not None else new_pool_handle()
        graph = torch.cuda.CUDAGraph()
        captured: list[Any] = []
        self._state = "capturing"
        try:
            with recording(
                graph, device=device, stream=stream, pool=pool, capture_error_mode=self._config.capture_error_mode
            ):
                captured.append(call())
            _check_outputs_on_cuda(captured[0])
        except BaseException:
            self._state = "empty"
            raise
        self._finish(state="cuda", output=captured[0], inputs=static, graph=graph, pool=pool, device=device)
        with torch.cuda.device(device):
            graph.replay()  # a capture only records: run once so the outputs hold fn's result
        return captured[0]

    @contextlib.contextmanager
    def _capture_block(self, static: tuple[torch.Tensor, ...]) -> Iterator[CaptureScope]:
        scope = CaptureScope()
        if not _runtime.cuda_available():
            self._state = "capturing"
            try:
                with marking_capture():
                    yield scope
            except BaseException:
                self._state = "empty"
                raise
            self._finish(state="eager-block", output=scope.output, inputs=static)
            return
        device = self._capture_device(static)
        stream = self._config.stream if self._config.stream is not None else side_stream(device)
        pool = self._config.pool if self._config.pool is not None else new_pool_handle()
        graph = torch.cuda.CUDAGraph()
        self._state = "capturing"
        try:
            with recording(
                graph, device=device, stream=stream, pool=pool, capture_error_mode=self._config.capture_error_mode
            ):
                yield scope
            _check_outputs_on_cuda(scope.output)
        except BaseException:
            self._state = "empty"
            raise
        self._finish(state="cuda", output=scope.output, inputs=static, graph=graph, pool=pool, device=device)
        with torch.cuda.device(device):
            graph.replay()  # the block was only recorded: run it once so its tensors hold the result

    def _finish(
        self,
        *,
        state: _State,
        output: Any,
        inputs: tuple[torch.Tensor, ...],
        call: Callable[[], Any] | None = None,
        graph: torch.cuda.CUDAGraph | None = None,
        pool: PoolHandle | None = None,
        device: torch.device | None = None,
    ) -> None:
        self._state = state
        self._guard_copies = any(t.is_inference() or t.requires_grad for t in inputs)
        self._output = output
        self._output_tensors = tensor_leaves(output)
        self._inputs = inputs
        self._call = call
        self._graph = graph
        self._pool = pool
        self._device = device

    def reset(self) -> None:
        """Drop the capture (graph, static outputs, recorded callable) so this object can capture again.

        The graph's pool memory returns to the pool (to the device once no graph uses the pool).
        """
        if self._state == "capturing":
            raise GraphStateError("cannot reset a CUDAGraph while it is being captured; finish the block first")
        graph, self._graph = self._graph, None
        if graph is not None:
            graph.reset()
        self._finish(state="empty", output=None, inputs=())

    # --- replay ---------------------------------------------------------------------------------------------

    def replay(self, *inputs: torch.Tensor | None, copy: bool = False) -> Any:
        """Re-run the captured work and return its output (the structure ``fn`` returned).

        Args:
            inputs: new data for the static inputs, in capture order; each is copied into its static tensor
                before the replay (``None`` keeps an input as it is). Shapes, dtypes and devices must match
                exactly: nothing is broadcast or converted.
            copy: return clones instead of the static outputs.

        The returned tensors are the static outputs unless ``copy``: the next replay overwrites them.

        Raises:
            GraphStateError: nothing captured yet.
            CapabilityError: the graph was captured with ``with graph.capture():`` on a machine without CUDA.
            GraphInputError: new inputs do not match the static inputs (the message names expected and got).
        """
        state = self._state
        if state == "cuda":
            if inputs:
                self._copy_inputs(inputs)
            assert self._graph is not None
            self._graph.replay()
        elif state == "emulated":
            if inputs:
                self._copy_inputs(inputs)
            self._rerun()
        else:
            raise self._not_replayable()
        return clone_outputs(self._output) if copy else self._output

    def _not_replayable(self) -> Exception:
        if self._state == "eager-block":
            return CapabilityError(
                "this graph was captured with `with graph.capture():` on a machine without CUDA: the block ran "
                "once, eagerly, and nothing was recorded that replay() could re-execute (CUDA available: False, "
                f"torch {torch.__version__}); capture a callable instead, graph.capture(fn, inputs=...), which "
                "replays eagerly without CUDA"
            )
        if self._state == "capturing":
            return GraphStateError("replay() called inside the capture; replay after the `with` block ends")
        return GraphStateError(
            "replay() called before a capture; capture first: graph.capture(fn) or `with graph.capture(): ...`"
        )

    def _copy_inputs(self, inputs: tuple[torch.Tensor | None, ...]) -> None:
        static = self._inputs
        if len(inputs) != len(static):
            hint = (
                "this graph has no static inputs: capture with inputs=(x, ...) to feed new data"
                if not static
                else "pass one tensor (or None to keep it) per static input, in capture order"
            )
            raise GraphInputError(f"expected {len(static)} replay inputs, got {len(inputs)}; {hint}")
        # Inference tensors (made under torch.inference_mode()) refuse in-place writes outside it, and leaves that
        # require grad refuse them with grad on; only then is a guard worth its cost on this hot path.
        with torch.inference_mode() if self._guard_copies else contextlib.nullcontext():
            for i, (new, old) in enumerate(zip(inputs, static, strict=True)):
                if new is None or new is old:
                    continue
                if not isinstance(new, torch.Tensor):
                    raise TypeError(f"expected replay input {i} to be a torch.Tensor or None, got {type(new).__name__}")
                if new.shape != old.shape or new.dtype != old.dtype or new.device != old.device:
                    raise GraphInputError(_mismatch(f"replay input {i}", old, new))
                old.copy_(new)

    def _rerun(self) -> None:
        assert self._call is not None
        # A CUDA graph replay records no autograd history; neither does its emulation.
        with torch.inference_mode() if self._captured_in_inference else torch.no_grad():
            fresh = tensor_leaves(self._call())
        kept = self._output_tensors
        if len(fresh) != len(kept):
            raise capture_error(
                "dynamic-output", f"the function returned {len(fresh)} tensors at replay, {len(kept)} at capture"
            )
        with torch.inference_mode():
            for i, (new, old) in enumerate(zip(fresh, kept, strict=True)):
                if new is old:
                    continue
                if new.shape != old.shape or new.dtype != old.dtype or new.device != old.device:
                    raise capture_error("dynamic-output", _mismatch(f"output tensor {i} at replay", old, new))
                old.copy_(new)


def _describe(tensor: torch.Tensor) -> str:
    return f"{format_shape(tensor.shape)} {dtype_name(tensor.dtype)} on {tensor.device}"


def _mismatch(what: str, expected: torch.Tensor, got: torch.Tensor) -> str:
    return (
        f"expected {what} to match the static tensor {_describe(expected)}, got {_describe(got)}; a graph replays "
        f"fixed shapes, dtypes and devices: convert the tensor, or capture another graph for this shape "
        f"(GraphPool, BatchBucketedGraphs)"
    )


def _check_static_inputs(inputs: object) -> tuple[torch.Tensor, ...]:
    if inputs is None:
        return ()
    static = as_tensor_tuple(inputs, "inputs")
    devices = {t.device for t in static}
    if len(devices) > 1:
        listing = ", ".join(f"inputs[{i}] on {t.device}" for i, t in enumerate(static))
        raise GraphInputError(f"expected every static input on one device, got {listing}; move them with .to(device)")
    return static


def _check_outputs_on_cuda(output: Any) -> None:
    for i, tensor in enumerate(tensor_leaves(output)):
        if tensor.device.type != "cuda":
            raise capture_error("cpu-tensor", f"output tensor {i} is on {tensor.device}")


def capture_graph(
    fn: Callable[..., Any],
    warmup_iters: int = 3,
    *,
    inputs: Sequence[torch.Tensor] | None = None,
    config: GraphCaptureConfig | None = None,
) -> CUDAGraph:
    """Capture ``fn`` after ``warmup_iters`` warm-up calls and return the :class:`CUDAGraph`.

    ``warmup_iters`` overrides ``config.warmup_iters``; the rest of ``config`` (pool, stream, error mode) applies.
    ``graph.replay()`` then returns ``fn``'s output structure; see :meth:`CUDAGraph.capture` for ``inputs``.
    """
    base = config if config is not None else GraphCaptureConfig()
    graph = CUDAGraph(dataclasses.replace(base, warmup_iters=warmup_iters))
    graph.capture(fn, inputs=inputs, warmup=True)
    return graph


def replay_graph(graph: CUDAGraph, *inputs: torch.Tensor | None, copy: bool = False) -> Any:
    """``graph.replay(*inputs, copy=copy)``: the function form of :meth:`CUDAGraph.replay`."""
    if not isinstance(graph, CUDAGraph):
        raise TypeError(f"expected a llamatelemetry CUDAGraph, got {type(graph).__name__}; capture one first")
    return graph.replay(*inputs, copy=copy)
