"""Dispatch that ``torch.compile`` traces without a graph break: the choice becomes a constant of the graph.

Dynamo cannot trace the selection machinery (locks, context variables, the environment), and need not: what
selection decides depends only on the device, dtype, shapes and facts of a call, on ``backend=`` and on
``LLAMATELEMETRY_BACKEND``. While Dynamo traces, :func:`dispatch` hands those as plain constants to
:func:`traced_choice`, which ``torch.compiler.assume_constant_result`` makes Dynamo run eagerly, once per trace,
baking the implementation's name into the graph; the implementation's traceable form is then traced in place.
Eagerly, :func:`dispatch` is :meth:`Operation.run` (one cached lookup per call).

So ``backend=`` and ``LLAMATELEMETRY_BACKEND`` are honoured under ``torch.compile`` as they are eagerly, with one
difference: a compiled graph keeps the choice it was traced with. After changing the variable and calling
:func:`~llamatelemetry_core.selection.reload_environment`, call ``torch._dynamo.reset()`` (or compile again) for
compiled code to choose again. The shapes handed over are specialized in the graph (Dynamo guards on them),
unless the facts have a ``selection_class()``: then no shapes are handed over, and the caller passes facts
whose values only keep what selection reads (attention passes lengths that compare as the call's do).

An implementation registered with ``traced=`` (a custom op wrapping a Triton launcher, say) is traced through
that callable; any other through its ``fn``, which must then be traceable (plain PyTorch, SDPA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from llamatelemetry_core.callspec import CallSpec
from llamatelemetry_core.device import get_device_info
from llamatelemetry_core.selection import Operation, get_operation

__all__ = ["FactsSpec", "dispatch", "traced_choice", "traced_name", "traced_request"]

FactsSpec = tuple[type, tuple[tuple[str, Any], ...]]
"""An operation's facts as their type and ``(field, value)`` pairs: what Dynamo can hand over as constants
(a dataclass instance built during tracing cannot be)."""


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def traced_choice(
    operation: str,
    backend: str | None,
    device: torch.device,
    dtype: torch.dtype,
    shapes: tuple[tuple[int, ...], ...],
    facts: FactsSpec | None,
) -> str:
    """The name of the implementation :meth:`Operation.dispatch` would run for this call (Dynamo runs this once,
    eagerly, while it traces, and uses the result as a constant). Raises as dispatch would when ``backend`` (or
    the environment) requests an implementation that cannot run the call; under ``torch.compile`` Dynamo wraps
    that :class:`BackendUnavailableError` in its own error (as ``__context__``), with the message kept."""
    op = get_operation(operation)
    built = None if facts is None else facts[0](**dict(facts[1]))
    call = CallSpec(device=get_device_info(device, refresh_memory=False), dtype=dtype, shapes=shapes, facts=built)
    return op.select(call, backend=backend).name


@torch.compiler.assume_constant_result  # type: ignore[untyped-decorator]
def traced_request(operation: str, backend: str | None) -> str:
    """The implementation requested for ``operation`` by ``backend`` or ``LLAMATELEMETRY_BACKEND`` (``""`` for
    automatic choice), as a constant of the graph being traced."""
    return get_operation(operation).requested_backend(backend) or ""


def dispatch(
    op: Operation,
    tensors: Sequence[torch.Tensor],
    *args: Any,
    facts: FactsSpec | None = None,
    backend: str | None = None,
    call_dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> Any:
    """Run ``op`` on ``args``: :meth:`Operation.run` eagerly, a traced constant choice under ``torch.compile``.

    ``tensors`` describe the call (the first gives the device and, unless ``call_dtype`` is given, the dtype; all
    give the shapes); ``facts`` are the operation's facts as a :data:`FactsSpec`. ``args`` and ``kwargs`` go to
    the implementation.
    """
    if not torch.compiler.is_compiling():
        built = None if facts is None else facts[0](**dict(facts[1]))
        return op.run(tensors, *args, facts=built, backend=backend, call_dtype=call_dtype, **kwargs)
    return _traceable(op, traced_name(op, tensors, facts, backend, call_dtype))(*args, **kwargs)


def traced_name(
    op: Operation,
    tensors: Sequence[torch.Tensor],
    facts: FactsSpec | None,
    backend: str | None,
    dtype: torch.dtype | None = None,
) -> str:
    """While Dynamo traces: the implementation :func:`traced_choice` names for the call ``tensors`` and ``facts``
    describe (``dtype`` in place of the first tensor's when given)."""
    first = tensors[0]
    # Facts with a selection_class() stand in for the shapes (see CallSpec.selection_key): then the shapes are not
    # handed over, and the compiled graph is not specialized to them.
    by_class = facts is not None and hasattr(facts[0], "selection_class")
    shapes = () if by_class else tuple(tuple(int(d) for d in t.shape) for t in tensors)
    name: str = traced_choice(op.name, backend, first.device, first.dtype if dtype is None else dtype, shapes, facts)
    return name


def _traceable(op: Operation, name: str) -> Callable[..., Any]:
    impl = op.registered(name)
    return impl.traced if impl.traced is not None else impl.fn
