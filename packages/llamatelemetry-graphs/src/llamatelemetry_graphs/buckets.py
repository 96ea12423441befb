"""One CUDA graph per batch size, with padding: :class:`BatchBucketedGraphs` and :func:`default_batch_buckets`.

A graph replays fixed shapes, but an LLM decode step sees a batch size that changes every step. The usual
answer (vLLM, SGLang; discussed in PyTorch #150484, llama.cpp #27009, flashinfer #2046) is to capture a graph
for a few batch sizes, pad each incoming batch up to the nearest captured size, and slice the padding off the
outputs. Capturing the largest size first lets the smaller graphs reuse its memory in a shared pool, so the
whole set costs about as much as the largest graph. Batches above the largest size run eagerly.

Padding is correct only for a function whose batch rows are independent (each output row depends only on its
own input row and the shared, non-batched inputs): padded rows are computed and then discarded.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import check_positive_int, dtype_name, format_shape
from llamatelemetry_graphs._tree import as_tensor_tuple, clone_outputs, map_tensors, tensor_leaves
from llamatelemetry_graphs.config import GraphCaptureConfig
from llamatelemetry_graphs.errors import GraphInputError, GraphStateError
from llamatelemetry_graphs.graph import CUDAGraph
from llamatelemetry_graphs.memory import GraphMemoryUsage
from llamatelemetry_graphs.pool import GraphPool

__all__ = ["BatchBucketedGraphs", "default_batch_buckets"]

Number = int | float | bool


def default_batch_buckets(max_batch_size: int) -> list[int]:
    """The batch sizes to capture: 1, 2, 4, 8, then every multiple of 8 up to ``max_batch_size`` (vLLM's list).

    ``max_batch_size`` itself is always included, so every batch from 1 to it has a graph:
    ``default_batch_buckets(20) == [1, 2, 4, 8, 16, 20]``.
    """
    check_positive_int(max_batch_size, "max_batch_size")
    sizes = [s for s in (1, 2, 4) if s < max_batch_size]
    sizes.extend(range(8, max_batch_size + 1, 8))
    if not sizes or sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


def _resolve_sizes(max_batch_size: int | None, batch_sizes: Sequence[int] | None) -> list[int]:
    if batch_sizes is None:
        if max_batch_size is None:
            raise ConfigurationError(
                "expected max_batch_size or batch_sizes, got neither; pass max_batch_size=64 for the default "
                "buckets 1, 2, 4, 8, 16, ... 64, or an explicit batch_sizes list"
            )
        return default_batch_buckets(max_batch_size)
    if isinstance(batch_sizes, int | str) or not isinstance(batch_sizes, Sequence):
        raise ConfigurationError(f"expected batch_sizes to be a list of positive ints, got {batch_sizes!r}")
    sizes = sorted({check_positive_int(s, "each batch size") for s in batch_sizes})
    if not sizes:
        raise ConfigurationError("expected at least one batch size, got an empty batch_sizes")
    if max_batch_size is not None and max_batch_size != sizes[-1]:
        raise ConfigurationError(
            f"expected max_batch_size to equal the largest of batch_sizes ({sizes[-1]}), got {max_batch_size}; "
            f"pass only one of them"
        )
    return sizes


def _per_input(value: Any, count: int, name: str) -> list[Any]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise ConfigurationError(f"expected {name} to have one entry per input ({count}), got {len(value)}")
        return list(value)
    return [value] * count


class BatchBucketedGraphs:
    """Graphs of ``fn`` for several batch sizes; calls pad up to the nearest one and slice the outputs back.

    Args:
        fn: the step, called as ``fn(*inputs)``; batch rows must be independent (see the module docstring).
        example_inputs: one tensor per input of ``fn``, with valid values: the batched ones (any batch size)
            seed the static buffers used for warm-up and capture; each non-batched one (a KV cache, a rotary
            table) *is* the static tensor, used in place by every graph and never copied.
        max_batch_size: the largest batch size; with ``batch_sizes=None`` selects :func:`default_batch_buckets`.
        batch_sizes: explicit batch sizes to capture (any order; the largest is the maximum).
        batch_dims: the batch dimension of each input (``None``: not batched); an int applies to every input.
        pad_values: what padded rows hold, per input or one for all. It must be valid for ``fn``: a token id
            inside the vocabulary, a cache slot that may be overwritten (vLLM pads slot mappings with -1 for
            kernels that skip negative slots). Default 0.
        output_batch_dim: the batch dimension of every output tensor, sliced back to the real batch size;
            ``None`` returns the outputs unsliced.
        config: capture settings shared by every graph (warm-up count, error mode, stream, pool).

    Call :meth:`capture` once, then call the object like ``fn``. Outputs are views of static buffers that the
    next call overwrites (pass ``copy=True`` to get clones); above the largest size ``fn`` runs eagerly and
    returns fresh tensors.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        example_inputs: Sequence[torch.Tensor],
        *,
        max_batch_size: int | None = None,
        batch_sizes: Sequence[int] | None = None,
        batch_dims: int | Sequence[int | None] | None = 0,
        pad_values: Number | Sequence[Number | None] = 0,
        output_batch_dim: int | None = 0,
        config: GraphCaptureConfig | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"expected fn to be callable, got {type(fn).__name__}")
        examples = as_tensor_tuple(example_inputs, "example_inputs")
        if not examples:
            raise ConfigurationError("expected at least one example input with a batch dimension, got none")
        self._fn = fn
        self._sizes = _resolve_sizes(max_batch_size, batch_sizes)
        self._dims = [
            _normalize_dim(d, t, i)
            for i, (d, t) in enumerate(zip(_per_input(batch_dims, len(examples), "batch_dims"), examples, strict=True))
        ]
        if all(d is None for d in self._dims):
            raise ConfigurationError(
                "expected at least one batched input, got batch_dims None for every input; give the batch "
                "dimension of the batched inputs (usually 0)"
            )
        self._pads = _per_input(pad_values, len(examples), "pad_values")
        if output_batch_dim is not None and (
            isinstance(output_batch_dim, bool) or not isinstance(output_batch_dim, int)
        ):
            raise ConfigurationError(f"expected output_batch_dim to be an int or None, got {output_batch_dim!r}")
        self._output_dim = output_batch_dim
        self._static = tuple(self._static_buffer(i, t) for i, t in enumerate(examples))
        self._pool = GraphPool(config)
        self._graphs: dict[int, CUDAGraph] = {}
        self._lock = threading.Lock()
        self.replays = 0
        """Calls served by a graph."""
        self.eager_calls = 0
        """Calls above the largest batch size, run eagerly."""

    def _static_buffer(self, index: int, example: torch.Tensor) -> torch.Tensor:
        dim = self._dims[index]
        if dim is None:
            return example
        shape = list(example.shape)
        shape[dim] = self._sizes[-1]
        pad = self._pads[index]
        if pad is None or isinstance(pad, bool) or not isinstance(pad, int | float):
            raise ConfigurationError(f"expected pad_values[{index}] to be a number for a batched input, got {pad!r}")
        with torch.no_grad():
            buffer = torch.full(shape, pad, dtype=example.dtype, device=example.device)
            rows = min(example.shape[dim], self._sizes[-1])
            buffer.narrow(dim, 0, rows).copy_(example.narrow(dim, 0, rows))
        return buffer

    # --- what it holds ----------------------------------------------------------------------------------------

    @property
    def batch_sizes(self) -> list[int]:
        """The captured batch sizes, ascending."""
        return list(self._sizes)

    @property
    def max_batch_size(self) -> int:
        return self._sizes[-1]

    @property
    def is_captured(self) -> bool:
        return bool(self._graphs)

    @property
    def is_cuda_graph(self) -> bool:
        """True when real CUDA graphs are behind the buckets (False for the eager emulation without CUDA)."""
        return any(g.is_cuda_graph for g in self._graphs.values())

    @property
    def pool(self) -> GraphPool:
        """The pool holding one graph per size, named ``batch_<size>``."""
        return self._pool

    def bucket_for(self, batch_size: int) -> int | None:
        """The smallest captured size >= ``batch_size``; ``None`` above the largest (the call runs eagerly)."""
        position = bisect.bisect_left(self._sizes, batch_size)
        return self._sizes[position] if position < len(self._sizes) else None

    def memory_usage(self) -> GraphMemoryUsage:
        """Memory held by the graphs' shared pool (see :meth:`GraphPool.memory_usage`)."""
        return self._pool.memory_usage()

    # --- capture ------------------------------------------------------------------------------------------------

    def capture(self) -> BatchBucketedGraphs:
        """Capture one graph per batch size, largest first, into one shared pool; return ``self``.

        The largest graph's outputs are the output buffers of every size: a smaller graph copies its result
        into their first rows (one small copy per output tensor), so outputs are held once, not once per size,
        and the set costs about the memory of the largest graph. With ``output_batch_dim=None`` each graph
        keeps its own outputs.

        Raises ``ConfigurationError`` if an output lacks the batch dimension ``output_batch_dim`` or changes
        structure with the batch size, plus what :meth:`CUDAGraph.capture` raises. On failure no graph is kept.
        """
        with self._lock:
            if self._graphs:
                raise GraphStateError(
                    "these buckets are already captured; create a new BatchBucketedGraphs to recapture"
                )
            try:
                shared: Any = None
                for size in reversed(self._sizes):
                    views = [
                        t if d is None else t.narrow(d, 0, size) for t, d in zip(self._static, self._dims, strict=True)
                    ]
                    step = self._fn if shared is None or self._output_dim is None else self._into(shared, size)
                    output = self._pool.capture(f"batch_{size}", step, inputs=views)
                    self._check_output(output, size)
                    if shared is None:
                        shared = output
                    self._graphs[size] = self._pool.get(f"batch_{size}")
            except BaseException:
                self._graphs.clear()
                self._pool.clear()
                raise
        return self

    def _into(self, shared: Any, size: int) -> Callable[..., Any]:
        """``fn`` for batch ``size`` writing its outputs into the first ``size`` rows of ``shared``'s tensors."""
        dim = self._output_dim
        assert dim is not None
        targets = [t.narrow(dim, 0, size) for t in tensor_leaves(shared)]
        result = map_tensors(lambda t: t.narrow(dim, 0, size), shared)
        fn = self._fn

        def step(*inputs: torch.Tensor) -> Any:
            produced = tensor_leaves(fn(*inputs))
            if len(produced) != len(targets):
                raise ConfigurationError(
                    f"expected fn to return {len(targets)} tensors at every batch size (as at {self._sizes[-1]}), "
                    f"got {len(produced)} at batch size {size}"
                )
            with torch.inference_mode():
                for i, (target, value) in enumerate(zip(targets, produced, strict=True)):
                    if value.shape != target.shape or value.dtype != target.dtype:
                        raise ConfigurationError(
                            f"expected output tensor {i} at batch size {size} to be {format_shape(target.shape)} "
                            f"{dtype_name(target.dtype)} (the largest batch's, with batch {size}), got "
                            f"{format_shape(value.shape)} {dtype_name(value.dtype)}; outputs may change only along "
                            f"output_batch_dim"
                        )
                    target.copy_(value)
            return result

        return step

    def _check_output(self, output: Any, size: int) -> None:
        dim = self._output_dim
        if dim is None:
            return
        for i, tensor in enumerate(tensor_leaves(output)):
            if not -tensor.dim() <= dim < tensor.dim() or tensor.shape[dim] != size:
                raise ConfigurationError(
                    f"expected output tensor {i} to have the batch size {size} at dim {dim} (output_batch_dim), got "
                    f"shape {format_shape(tensor.shape)}; set output_batch_dim to the outputs' batch dimension, or "
                    f"None to return them unsliced"
                )

    # --- call ---------------------------------------------------------------------------------------------------

    def __call__(self, *inputs: torch.Tensor, copy: bool = False) -> Any:
        """Run ``fn(*inputs)`` through the graph of the nearest batch size >= the batch size of ``inputs``.

        Batched inputs are copied into the static buffers and padded with ``pad_values``; non-batched inputs
        are copied into their static tensors unless they are those tensors. Outputs are sliced back to the
        batch size (views of static buffers unless ``copy``). Above the largest size, ``fn(*inputs)`` runs
        eagerly.

        Raises:
            GraphStateError: :meth:`capture` was not called.
            GraphInputError: wrong number of inputs, or a shape, dtype or device that does not match.
        """
        with self._lock:
            if not self._graphs:
                raise GraphStateError("call capture() before running the buckets: graphs.capture()")
            batch = self._check_inputs(inputs)
            bucket = self.bucket_for(batch)
            if bucket is None:
                self.eager_calls += 1
                return self._fn(*inputs)
            with torch.inference_mode():  # the static tensors may be inference tensors
                for x, static, dim, pad in zip(inputs, self._static, self._dims, self._pads, strict=True):
                    if dim is None:
                        if x is not static:
                            static.copy_(x)
                        continue
                    static.narrow(dim, 0, batch).copy_(x)
                    if batch < bucket:
                        static.narrow(dim, batch, bucket - batch).fill_(pad)
            output = self._graphs[bucket].replay()
            self.replays += 1
            out_dim = self._output_dim
            if out_dim is not None and batch < bucket:
                output = map_tensors(lambda t: t.narrow(out_dim, 0, batch), output)
            return clone_outputs(output) if copy else output

    def _check_inputs(self, inputs: tuple[torch.Tensor, ...]) -> int:
        if len(inputs) != len(self._static):
            raise GraphInputError(f"expected {len(self._static)} inputs (as in example_inputs), got {len(inputs)}")
        batch: int | None = None
        for i, (x, static, dim) in enumerate(zip(inputs, self._static, self._dims, strict=True)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"expected input {i} to be a torch.Tensor, got {type(x).__name__}")
            expected = list(static.shape)
            if dim is not None and x.dim() == static.dim():
                expected[dim] = x.shape[dim]
            if list(x.shape) != expected or x.dtype != static.dtype or x.device != static.device:
                what = "any batch size" if dim is not None else "not batched"
                shown = ["B" if d == dim else str(s) for d, s in enumerate(static.shape)]
                raise GraphInputError(
                    f"expected input {i} of shape [{', '.join(shown)}] ({what}) {dtype_name(static.dtype)} on "
                    f"{static.device}, got {format_shape(x.shape)} {dtype_name(x.dtype)} on {x.device}; convert it, "
                    f"or build the buckets for this layout"
                )
            if dim is None:
                continue
            if batch is None:
                batch = x.shape[dim]
            elif x.shape[dim] != batch:
                raise GraphInputError(
                    f"expected every batched input to have the same batch size, got {batch} and {x.shape[dim]} "
                    f"(input {i}, dim {dim})"
                )
        assert batch is not None
        if batch == 0:
            raise GraphInputError("expected a batch size >= 1, got 0; skip the call for an empty batch")
        return batch


def _normalize_dim(dim: object, tensor: torch.Tensor, index: int) -> int | None:
    if dim is None:
        return None
    if not _is_int(dim) or not -tensor.dim() <= dim < tensor.dim():
        raise ConfigurationError(
            f"expected batch_dims[{index}] to be None or a dimension of example_inputs[{index}] (shape "
            f"{format_shape(tensor.shape)}), got {dim!r}"
        )
    return dim % tensor.dim()


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
