"""A kernel that fails to build is an environment fact: recorded once, warned once, fallen back from."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from llamatelemetry_core.build_failures import build_failure_reason
from llamatelemetry_core.device import get_device_info
from llamatelemetry_core.environment import triton_devices, triton_interpreter_enabled
from llamatelemetry_core.errors import BackendUnavailableError, ConfigurationError
from llamatelemetry_core.selection import (
    BACKEND_ENV,
    BackendFallbackWarning,
    CallSpec,
    Operation,
    kernel_failures,
    record_selections,
    reload_environment,
    reset_fallback_warnings,
    reset_kernel_failures,
)

_counter = itertools.count()


# Stand-ins for Triton's own error classes, matched by module and name as the real ones are (so that these
# tests run without Triton too; the test at the end launches a real broken kernel).
class CompilationError(Exception):
    pass


CompilationError.__module__ = "triton.compiler.errors"


class OutOfResources(Exception):
    pass


OutOfResources.__module__ = "triton.runtime.errors"


def _raise_from_compiler_module(exc: Exception) -> None:
    """Raise ``exc`` from a frame whose module is a Triton backend's compiler (an MLIR pass failure, say)."""
    namespace: dict[str, Any] = {"__name__": "triton.backends.nvidia.compiler"}
    exec("def run_passes(exc):\n    raise exc\n", namespace)
    namespace["run_passes"](exc)


def _reference(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    reload_environment()
    reset_fallback_warnings()
    reset_kernel_failures()


class _Broken:
    """An implementation that raises ``error()`` on every call and counts its calls."""

    def __init__(self, error: Callable[[], Exception]) -> None:
        self.error = error
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        raise self.error()


def _op_with(fn: Callable[..., Any], name: str = "kernel") -> Operation:
    op = Operation(f"build_failure_{next(_counter)}", _reference)
    op.register(name, fn, priority=10, devices={"cpu"})
    return op


def test_compile_failure_warns_once_falls_back_and_is_not_retried() -> None:
    broken = _Broken(lambda: CompilationError("at 1:0:\ndef _kernel(\n^\nAttributeError('tl.gone')"))
    op = _op_with(broken)
    x = torch.randn(5)
    call = CallSpec.from_tensors(x)
    with pytest.warns(BackendFallbackWarning, match=r"'kernel' cannot run here \(its kernel failed to build with"):
        out = op.dispatch(call, x)
    assert torch.equal(out, x * 2) and broken.calls == 1
    with record_selections() as rec:
        for _ in range(3):  # no second warning (pytest turns it into an error), no second attempt
            assert torch.equal(op.dispatch(call, x), x * 2)
    assert broken.calls == 1 and rec.implementations(op.name) == ["reference"] * 3
    skipped = dict(rec.selections[-1].skipped)
    assert "CompilationError: at 1:0: def _kernel( AttributeError('tl.gone')" in skipped["kernel"]

    (failure,) = kernel_failures(op.name)
    assert failure.implementation == "kernel" and failure.dtype == "float32"
    assert failure.device == f"cpu ({get_device_info('cpu').name})"
    assert failure.toolchain.startswith("triton ") and f"torch {torch.__version__}" in failure.toolchain
    assert op.select(call).name == "reference"
    reasons = {c.name: c.reason for c in op.explain(call)}
    assert reasons["kernel"] == failure.reason and reasons["reference"] is None


def test_failure_is_recorded_per_dtype_and_forgotten_on_reset() -> None:
    broken = _Broken(lambda: CompilationError("no such instruction"))
    op = _op_with(broken)
    x = torch.randn(4)
    with pytest.warns(BackendFallbackWarning):
        op.dispatch(CallSpec.from_tensors(x), x)
    wide = x.double()
    op.dispatch(CallSpec.from_tensors(wide), wide)  # another dtype is tried again (the same reason warns no more)
    assert broken.calls == 2 and sorted(f.dtype or "" for f in kernel_failures(op.name)) == ["float32", "float64"]
    reset_kernel_failures()
    assert kernel_failures(op.name) == []
    assert op.select(CallSpec.from_tensors(x)).name == "kernel"


def test_requested_backend_raises_with_the_compile_error_chained(monkeypatch: pytest.MonkeyPatch) -> None:
    op = _op_with(_Broken(lambda: CompilationError("block pointers have been removed")))
    x = torch.randn(3)
    call = CallSpec.from_tensors(x)
    with pytest.raises(BackendUnavailableError, match="requested implementation 'kernel' cannot run") as info:
        op.dispatch(call, x, backend="kernel")
    assert isinstance(info.value.__cause__, CompilationError)
    assert len(kernel_failures(op.name)) == 1
    monkeypatch.setenv(BACKEND_ENV, f"{op.name}=kernel")
    reload_environment()
    with pytest.raises(BackendUnavailableError, match="block pointers have been removed") as info:
        op.dispatch(call, x)
    assert isinstance(info.value.__cause__, CompilationError)


@pytest.mark.parametrize(
    "error",
    [
        lambda: ConfigurationError("expected x of shape [N], got [2, 3]"),
        lambda: TypeError("expected x to be a torch.Tensor, got list"),
        lambda: ValueError("a bad argument"),
        lambda: IndexError("a real bug"),
    ],
    ids=["configuration", "type", "value", "bug"],
)
def test_user_errors_and_bugs_propagate_and_are_not_recorded(error: Callable[[], Exception]) -> None:
    op = _op_with(_Broken(error))
    x = torch.randn(3)
    with pytest.raises(type(error())):
        op.dispatch(CallSpec.from_tensors(x), x)
    assert kernel_failures(op.name) == []


def test_validation_error_raised_while_handling_a_compile_error_propagates() -> None:
    def validating(x: torch.Tensor) -> torch.Tensor:
        try:
            raise CompilationError("inner")
        except CompilationError as exc:
            raise ConfigurationError("expected a contiguous x") from exc

    op = _op_with(validating)
    x = torch.randn(3)
    with pytest.raises(ConfigurationError, match="contiguous"):
        op.dispatch(CallSpec.from_tensors(x), x)
    assert kernel_failures(op.name) == []


def test_backend_unavailable_caused_by_a_compile_error_is_recorded() -> None:
    def wrapped(x: torch.Tensor) -> torch.Tensor:
        try:
            raise CompilationError("ptx too new")
        except CompilationError as exc:
            raise BackendUnavailableError("the Triton kernel could not be compiled") from exc

    op = _op_with(wrapped)
    x = torch.randn(3)
    with pytest.warns(BackendFallbackWarning, match="ptx too new"):
        op.dispatch(CallSpec.from_tensors(x), x)
    assert [f.error for f in kernel_failures(op.name)] == ["CompilationError: ptx too new"]


def test_out_of_resources_falls_back_for_the_call_only() -> None:
    def too_big(x: torch.Tensor) -> torch.Tensor:
        try:
            raise OutOfResources("shared memory, required: 300000, hardware limit: 232448")
        except OutOfResources as exc:
            raise BackendUnavailableError("the Triton kernel could not be launched here") from exc

    op = _op_with(too_big)
    x = torch.randn(3)
    with pytest.warns(BackendFallbackWarning, match="could not be launched"):
        op.dispatch(CallSpec.from_tensors(x), x)
    assert kernel_failures(op.name) == []
    assert op.select(CallSpec.from_tensors(x)).name == "kernel"


def test_errors_raised_inside_tritons_compiler_are_build_failures() -> None:
    def passes_fail(x: torch.Tensor) -> torch.Tensor:
        _raise_from_compiler_module(RuntimeError("PassManager::run failed"))
        raise AssertionError("unreachable")

    op = _op_with(passes_fail)
    x = torch.randn(3)
    with pytest.warns(BackendFallbackWarning, match="PassManager::run failed"):
        op.dispatch(CallSpec.from_tensors(x), x)
    assert len(kernel_failures(op.name)) == 1
    # The same RuntimeError raised by our own code is a bug, not an environment fact.
    assert build_failure_reason(RuntimeError("PassManager::run failed")) is None


def test_long_compiler_messages_are_shortened_to_one_line() -> None:
    reason = build_failure_reason(CompilationError("x" * 1000 + "\n" + "y" * 10))
    assert reason is not None and len(reason) == 300 and "\n" not in reason and reason.endswith("...")


# A kernel that cannot be built with any Triton: it calls a function triton.language does not have, as a kernel
# written for another Triton release would.
def _broken_kernel_launcher() -> Callable[[torch.Tensor], torch.Tensor]:
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def _removed_api_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        offsets = tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask)
        tl.store(y_ptr + offsets, tl.function_removed_in_this_release(x), mask=mask)

    def launch(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        _removed_api_kernel[(1,)](x, y, x.numel(), BLOCK=64)
        return y

    return launch


@pytest.mark.triton
def test_a_real_kernel_that_fails_to_build_falls_back_once() -> None:
    op = Operation(f"build_failure_{next(_counter)}", _reference)
    op.register("triton", _broken_kernel_launcher(), priority=10, devices=triton_devices)
    device = "cpu" if triton_interpreter_enabled() else "cuda"
    x = torch.randn(37, device=device)
    call = CallSpec.from_tensors(x)
    with pytest.warns(BackendFallbackWarning, match="'triton' cannot run here"):
        out = op.dispatch(call, x)
    assert torch.equal(out, x * 2)
    assert torch.equal(op.dispatch(call, x), x * 2)  # no second warning
    (failure,) = kernel_failures(op.name)
    assert "function_removed_in_this_release" in failure.error
    with pytest.raises(BackendUnavailableError) as info:
        op.dispatch(call, x, backend="triton")
    assert type(info.value.__cause__).__module__.startswith("triton.")
