"""Dispatch under torch.compile: no graph break, and the choice (backend=, LLAMATELEMETRY_BACKEND) is honoured."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from llamatelemetry_core.errors import BackendUnavailableError
from llamatelemetry_core.selection import BACKEND_ENV, CallSpec, Operation, reload_environment
from llamatelemetry_core.traced import FactsSpec, dispatch, traced_choice

_counter = itertools.count()


@dataclass(frozen=True)
class _Facts:
    scale: int


def _reference(x: torch.Tensor, *, scale: int) -> torch.Tensor:
    return x * scale


def _fast(x: torch.Tensor, *, scale: int) -> torch.Tensor:
    return x * scale + 1000  # observably different, so a test can tell which implementation ran


def _big_scales_only(call: CallSpec) -> str | None:
    facts = call.facts_as(_Facts)
    return None if facts is None or facts.scale > 2 else "takes scales > 2 only"


def _op() -> Operation:
    op = Operation(f"traced_{next(_counter)}", _reference)
    op.register("fast", _fast, priority=10, devices={"cpu"}, checks=[_big_scales_only])
    return op


def _call(op: Operation, x: torch.Tensor, scale: int, backend: str | None = None) -> torch.Tensor:
    facts: FactsSpec = (_Facts, (("scale", scale),))
    result: torch.Tensor = dispatch(op, (x,), x, facts=facts, backend=backend, scale=scale)
    return result


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    reload_environment()
    torch._dynamo.reset()


@pytest.mark.parametrize("scale", [2, 3])
def test_compiled_choice_equals_the_eager_choice_with_no_graph_break(scale: int) -> None:
    op = _op()
    x = torch.randn(5)
    compiled = torch.compile(lambda t: _call(op, t, scale), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), _call(op, x, scale))
    assert torch.equal(compiled(x), x * scale + (1000 if scale > 2 else 0))


def test_backend_argument_and_environment_are_honoured_under_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    op = _op()
    x = torch.randn(3)
    forced = torch.compile(lambda t: _call(op, t, 3, backend="reference"), fullgraph=True, backend="eager")
    assert torch.equal(forced(x), x * 3)
    monkeypatch.setenv(BACKEND_ENV, f"{op.name}=reference")
    reload_environment()
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: _call(op, t, 3), fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), x * 3)


def test_an_impossible_request_raises_while_compiling() -> None:
    op = _op()
    x = torch.randn(3)
    compiled = torch.compile(lambda t: _call(op, t, 2, backend="fast"), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="takes scales > 2 only") as raised:
        compiled(x)
    # Dynamo wraps what a function it runs while tracing raises; the error it wraps is ours.
    error = raised.value
    assert isinstance(error, BackendUnavailableError) or isinstance(error.__context__, BackendUnavailableError)


def test_a_traced_form_replaces_the_implementation_under_compile_only() -> None:
    op = Operation(f"traced_{next(_counter)}", _reference)
    op.register("fast", _fast, priority=10, devices={"cpu"}, traced=lambda x, *, scale: x * scale - 1)
    x = torch.randn(4)
    eager = dispatch(op, (x,), x, scale=2)
    compiled = torch.compile(lambda t: dispatch(op, (t,), t, scale=2), fullgraph=True, backend="eager")
    assert torch.equal(eager, x * 2 + 1000) and torch.equal(compiled(x), x * 2 - 1)
    with pytest.raises(TypeError, match="traced to be callable"):
        op.register("other", _fast, priority=1, devices={"cpu"}, traced=3)  # type: ignore[arg-type]


def test_traced_choice_eagerly_names_what_dispatch_runs() -> None:
    op = _op()
    cpu = torch.device("cpu")
    assert traced_choice(op.name, None, cpu, torch.float32, ((3,),), (_Facts, (("scale", 3),))) == "fast"
    assert traced_choice(op.name, None, cpu, torch.float32, ((3,),), (_Facts, (("scale", 1),))) == "reference"
