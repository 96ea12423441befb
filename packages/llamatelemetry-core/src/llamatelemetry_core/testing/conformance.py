"""What every public operation promises, checked the same way for each: the conformance suite.

Each operation's tests describe it once, as a :class:`Conformance`, and get the standard test functions from
:func:`conformance_tests` (or call the checks from their own tests):

* :meth:`Conformance.check_implementations`: every implementation that runs the call here (requested by name)
  gives the reference's result within the shared tolerance of the dtype; an implementation that cannot run it
  raises ``BackendUnavailableError`` (a request is never silently ignored); the reference always runs.
* :meth:`Conformance.check_fullgraph`: ``torch.compile(fullgraph=True)`` traces the public call with no graph
  break and gives the eager result.
* :meth:`Conformance.check_fallback`: ``LLAMATELEMETRY_BACKEND=<operation>=reference`` is honoured (the
  reference runs and is recorded as requested).
* :meth:`Conformance.check_cuda_graph`: the public call captured in a CUDA graph and replayed on new inputs
  gives the eager result (GPU only).
* :meth:`Conformance.check_opcheck`: ``torch.library.opcheck`` on a custom op the operation uses.

Inputs come from ``inputs(generator, dtype, device)``, called afresh for every run (an operation may write its
inputs in place), returning the positional arguments of the public call.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from llamatelemetry_core.errors import BackendUnavailableError
from llamatelemetry_core.selection import (
    BACKEND_ENV,
    REFERENCE,
    Operation,
    last_selection,
    record_selections,
    reload_environment,
)
from llamatelemetry_core.testing.compare import assert_close

__all__ = ["Conformance", "conformance_tests"]

Inputs = Callable[[torch.Generator, torch.dtype, torch.device], tuple[Any, ...]]


def _first_tensor(result: Any) -> torch.Tensor:
    """The tensor a call's result is compared by (the first of a tuple: ``rope`` returns ``(q, k)``)."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, tuple | list) and result and all(isinstance(t, torch.Tensor) for t in result):
        return torch.cat([t.reshape(-1) for t in result])
    raise TypeError(f"expected a tensor or a tuple of tensors from the call, got {type(result).__name__}")


@dataclass(frozen=True)
class Conformance:
    """One public operation: its registry entry, its public call, how to make inputs.

    ``call(*inputs, backend=None)`` is the public function; ``reference(*inputs)`` the specification it is
    compared with (the operation's ``reference`` implementation through the public call when ``None``).
    """

    operation: Operation
    call: Callable[..., Any]
    inputs: Inputs
    seed: int = 0

    def _inputs(self, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
        return self.inputs(torch.Generator().manual_seed(self.seed), dtype, device)

    def _expected(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return _first_tensor(self.call(*self._inputs(dtype, device), backend=REFERENCE)).clone()

    def check_implementations(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> list[str]:
        """Every implementation that runs here against the reference; returns the names that ran."""
        device = torch.device(device)
        expected = self._expected(dtype, device)
        ran: list[str] = []
        for impl in self.operation.implementations:
            try:
                got = _first_tensor(self.call(*self._inputs(dtype, device), backend=impl.name))
            except BackendUnavailableError:
                continue  # it says why it cannot run this call here; a request is never ignored silently
            selection = last_selection(self.operation.name)
            assert selection is not None and selection.implementation == impl.name and selection.requested, (
                f"{self.operation.name}: requested {impl.name!r}, recorded {selection}"
            )
            assert_close(got, expected, name=f"{self.operation.name} [{impl.name}]", dtype=dtype)
            ran.append(impl.name)
        assert REFERENCE in ran, f"{self.operation.name}: the reference did not run"
        return ran

    def check_fullgraph(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        """``torch.compile(fullgraph=True)`` of the public call: no graph break, the eager result."""
        device = torch.device(device)
        torch._dynamo.reset()
        compiled = torch.compile(lambda *args: self.call(*args), fullgraph=True, backend="eager")
        got = _first_tensor(compiled(*self._inputs(dtype, device)))
        want = _first_tensor(self.call(*self._inputs(dtype, device)))
        assert_close(got, want, name=f"{self.operation.name} compiled", dtype=dtype)

    def check_fallback(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        """``LLAMATELEMETRY_BACKEND=<operation>=reference`` runs the reference, recorded as requested."""
        device = torch.device(device)
        before = os.environ.get(BACKEND_ENV)
        os.environ[BACKEND_ENV] = f"{self.operation.name}={REFERENCE}"
        try:
            reload_environment()
            with record_selections() as record:
                got = _first_tensor(self.call(*self._inputs(dtype, device)))
            assert record.implementations(self.operation.name)[-1:] == [REFERENCE], record.selections
            assert record.selections[-1].requested
        finally:
            if before is None:
                os.environ.pop(BACKEND_ENV, None)
            else:
                os.environ[BACKEND_ENV] = before
            reload_environment()
        assert_close(got, self._expected(dtype, device), name=f"{self.operation.name} forced reference", dtype=dtype)

    def check_cuda_graph(self, dtype: torch.dtype) -> None:
        """Capture the public call in a CUDA graph, replay it on new inputs copied in: the eager result."""
        device = torch.device("cuda")
        static = self._inputs(dtype, device)
        self.call(*static)  # compile and probe before capturing
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = self.call(*static)
        fresh = self.inputs(torch.Generator().manual_seed(self.seed + 1), dtype, device)
        for target, value in zip(static, fresh, strict=True):
            if isinstance(target, torch.Tensor):
                target.copy_(value)
        graph.replay()
        got = _first_tensor(captured).clone()
        want = _first_tensor(self.call(*self.inputs(torch.Generator().manual_seed(self.seed + 1), dtype, device)))
        assert_close(got, want, name=f"{self.operation.name} CUDA graph", dtype=dtype)

    @staticmethod
    def check_opcheck(custom_op: Any, args: Sequence[Any]) -> None:
        """``torch.library.opcheck`` (schema, fake, autograd registration) on ``custom_op`` with ``args``."""
        torch.library.opcheck(custom_op, tuple(args))


TestFunction = Callable[..., None]


def conformance_tests(
    suites: Mapping[str, Conformance], dtypes: Sequence[torch.dtype], device: torch.device
) -> tuple[TestFunction, TestFunction, TestFunction]:
    """The three standard tests over ``suites`` (by name), for a test module to bind to ``test_*`` names:
    every implementation against the reference in each of ``dtypes``; the fullgraph compile and the backend
    variable (float32); CUDA-graph capture and replay (float16, GPU only)."""
    names = sorted(suites)

    @pytest.mark.parametrize("dtype", list(dtypes), ids=str)
    @pytest.mark.parametrize("name", names)
    def implementations(name: str, dtype: torch.dtype) -> None:
        suites[name].check_implementations(dtype, device)

    @pytest.mark.parametrize("name", names)
    def fullgraph_and_fallback(name: str) -> None:
        suites[name].check_fullgraph(torch.float32, device)
        suites[name].check_fallback(torch.float32, device)

    @pytest.mark.gpu
    @pytest.mark.parametrize("name", names)
    def cuda_graph(name: str) -> None:
        suites[name].check_cuda_graph(torch.float16)

    return implementations, fullgraph_and_fallback, cuda_graph
