"""Kernels that could not be built here: telling such a failure from a bug, and remembering it.

A Triton kernel is compiled on its first launch, in the user's process, by the Triton the user installed. When
that compilation fails (a Triton release that removed a language feature, a compiler bug for one GPU
architecture), the failure is a fact of the environment, not of the call: every later call with the same kernel
would fail the same way. :class:`~llamatelemetry_core.selection.Operation` therefore hands every exception
raised by an automatically chosen implementation to :func:`build_failure_reason`; for a build failure it records a
:class:`KernelFailure` for that implementation, device and dtype, warns once, and runs the next implementation,
now and for every later call with the same key. An implementation requested explicitly still raises
(:class:`~llamatelemetry_core.errors.BackendUnavailableError`, chained to the compiler's error). Anything that
is not a build failure propagates untouched: a bug is never hidden behind a fallback.

A build failure is:

* one of Triton's compilation errors (``CompilationError`` and its subclasses, ``PTXASError``), or the
  interpreter's ``InterpreterError`` under ``TRITON_INTERPRET=1`` (there, the interpreter is the compiler);
* any other exception raised from inside Triton's compiler (``triton.compiler`` or a backend's ``compiler``
  module), such as an MLIR pass failure surfacing as a ``RuntimeError``;
* either of these as the cause of a ``BackendUnavailableError``.

It is not: ``OutOfResources`` (a launch configuration too large for this shape on this GPU: the call falls back,
later calls of other shapes still try the kernel), an error raised by llamatelemetry's own validation
(``ConfigurationError``, ``TypeError``, ...), or any other exception.

:func:`kernel_failures` lists what was recorded in this process (``llamatelemetry doctor`` and bug reports read
it); :func:`reset_kernel_failures` forgets it, so that the next call tries the kernel again.
"""

from __future__ import annotations

import importlib.metadata
import threading
from dataclasses import dataclass

import torch

from llamatelemetry_core.device import DeviceInfo
from llamatelemetry_core.errors import BackendUnavailableError, LlamaTelemetryError
from llamatelemetry_core.validation import dtype_name

__all__ = [
    "KernelFailure",
    "build_failure_reason",
    "failures_generation",
    "kernel_failures",
    "record_failure",
    "recorded_failure",
    "reset_kernel_failures",
]

# Triton's exception classes (triton.errors.TritonError and subclasses) that mean "this kernel cannot be built".
_BUILD_ERRORS = frozenset({"CompilationError", "CompileTimeAssertionFailure", "UnsupportedLanguageConstruct"})
_BUILD_ERRORS |= {"PTXASError", "InterpreterError"}
_MAX_MESSAGE = 300


@dataclass(frozen=True)
class KernelFailure:
    """An implementation of an operation that failed to build on a device, as recorded in this process.

    ``device`` names the device (``"cuda:0 (NVIDIA H100 80GB HBM3)"``), ``dtype`` the call's main dtype (``None``
    when the call had none), ``error`` the compiler's error on one line, ``toolchain`` the Triton and torch
    versions that produced it.
    """

    operation: str
    implementation: str
    device: str
    dtype: str | None
    error: str
    toolchain: str

    @property
    def reason(self) -> str:
        """The reason dispatch and ``explain`` give for not choosing the implementation."""
        return f"its kernel failed to build with {self.toolchain}: {self.error}"


_Key = tuple[object, ...]
_lock = threading.Lock()
_failures: dict[_Key, KernelFailure] = {}
_generation = [0]  # bumped whenever the recorded failures change: selection caches compare it


def failures_generation() -> int:
    """A number that changes whenever a failure is recorded or the record is reset (selection caches key on it)."""
    return _generation[0]


def _triton_class(exc: BaseException) -> str | None:
    """The name of the Triton build-error class ``exc`` belongs to, if any."""
    for cls in type(exc).__mro__:
        if cls.__module__.startswith("triton.") and cls.__name__ in _BUILD_ERRORS:
            return cls.__name__
    return None


def _raised_in_compiler(exc: BaseException) -> bool:
    """Whether ``exc`` was raised from inside Triton's compiler (its frontend or a backend's compiler module)."""
    tb = exc.__traceback__
    while tb is not None:
        module = str(tb.tb_frame.f_globals.get("__name__", ""))
        if module.startswith("triton.compiler") or (
            module.startswith("triton.backends.") and module.endswith("compiler")
        ):
            return True
        tb = tb.tb_next
    return False


def _one_line(exc: BaseException) -> str:
    lines = (line.strip() for line in str(exc).splitlines())
    text = " ".join(line for line in lines if line and line != "^")
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def build_failure_reason(exc: BaseException) -> str | None:
    """``exc`` (or the exception that caused it) on one line if it is a kernel build failure, else ``None``.

    See the module docstring for what counts. llamatelemetry's own errors other than
    ``BackendUnavailableError`` are never build failures, whatever caused them.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, LlamaTelemetryError) and not isinstance(current, BackendUnavailableError):
            return None
        if _triton_class(current) is not None or (
            not isinstance(current, LlamaTelemetryError) and _raised_in_compiler(current)
        ):
            return _one_line(current)
        current = current.__cause__ if current.__cause__ is not None else current.__context__
    return None


def _key(operation: str, implementation: str, device: DeviceInfo, dtype: torch.dtype | None) -> _Key:
    return (operation, implementation, device.kind, device.index, device.name, device.compute_capability, dtype)


def _device_label(device: DeviceInfo) -> str:
    where = device.kind if device.index is None else f"{device.kind}:{device.index}"
    return f"{where} ({device.name})"


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def record_failure(
    operation: str, implementation: str, device: DeviceInfo, dtype: torch.dtype | None, error: str
) -> KernelFailure:
    """Record that ``implementation`` of ``operation`` failed to build on ``device`` for ``dtype``; the first
    record of a key is kept (its reason stays the same, so the warning about it is issued once)."""
    key = _key(operation, implementation, device, dtype)
    failure = KernelFailure(
        operation=operation,
        implementation=implementation,
        device=_device_label(device),
        dtype=None if dtype is None else dtype_name(dtype),
        error=error,
        toolchain=f"triton {_version('triton')}, torch {torch.__version__}",
    )
    with _lock:
        if key not in _failures:
            _generation[0] += 1
        return _failures.setdefault(key, failure)


def recorded_failure(
    operation: str, implementation: str, device: DeviceInfo, dtype: torch.dtype | None
) -> KernelFailure | None:
    """The failure recorded for this key, or ``None`` (the common case costs one truth test of a dict)."""
    if not _failures:
        return None
    with _lock:
        return _failures.get(_key(operation, implementation, device, dtype))


def kernel_failures(operation: str | None = None) -> list[KernelFailure]:
    """Every build failure recorded in this process (of ``operation`` alone when given), oldest first.

    An implementation listed here is not chosen for that device and dtype again until
    :func:`reset_kernel_failures`; ``Operation.explain`` and ``Operation.select`` give its
    :attr:`~KernelFailure.reason`.
    """
    with _lock:
        return [f for f in _failures.values() if operation is None or f.operation == operation]


def reset_kernel_failures() -> None:
    """Forget every recorded build failure: the next call tries each kernel again (after upgrading Triton, in tests)."""
    with _lock:
        _failures.clear()
        _generation[0] += 1
