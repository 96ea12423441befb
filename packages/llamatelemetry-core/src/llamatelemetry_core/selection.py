"""Choosing an implementation of an operation, the same way for every operation.

Each operation (``Operation``) has a pure-PyTorch *reference*: the specification, the CPU fallback and the test
oracle. Faster implementations (Triton, flash-attn, SDPA, ...) register beside it with a priority and declare
what they support: the device kinds they run on and checks over the call (capability, dtypes, shapes, installed
packages). Dispatch takes the highest-priority implementation that supports the call:

* An implementation whose device kind does not match the call is simply not applicable (a Triton kernel for a
  CPU tensor): nothing is said.
* A better implementation that targets this device but cannot run the call (Triton not installed, a GPU too old)
  is skipped with one :class:`BackendFallbackWarning` per operation, implementation and reason. A check may
  answer with a :class:`QuietReason` instead (an optional extra the user chose not to install): the
  implementation is then skipped without a warning, and the reason is still recorded.
* An automatically chosen implementation whose kernel fails to build here (Triton's compiler rejects it: see
  :mod:`llamatelemetry_core.build_failures` for what counts) is an environment fact: dispatch records it for
  that device and dtype (:func:`kernel_failures`), warns once, runs the next implementation, and does not try
  the failed one again for that key; :meth:`Operation.explain` and :meth:`Operation.select` then give the
  failure as the reason. An implementation may also raise :class:`BackendUnavailableError` at run time to
  have this one call fall back (with one warning). Any other exception propagates: a bug is never hidden
  behind a fallback, and errors of validation reach the caller.
* An implementation requested explicitly, by the ``backend=`` argument of a public function or through
  ``LLAMATELEMETRY_BACKEND``, either runs or raises :class:`BackendUnavailableError` saying why (chained to
  the compiler's error when its kernel failed to build).

``LLAMATELEMETRY_BACKEND`` holds either one implementation name, applied to every operation that has an
implementation of that name (``reference`` forces every fallback), or a comma-separated list of
``operation=implementation`` pairs, which are strict.

Which implementation ran is observable: :func:`last_selection` for the latest call of an operation and
:func:`record_selections` for every call inside a block.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import os
import threading
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from llamatelemetry_core.build_failures import (
    KernelFailure,
    build_failure_reason,
    kernel_failures,
    record_failure,
    recorded_failure,
    reset_kernel_failures,
)
from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.errors import BackendUnavailableError, ConfigurationError
from llamatelemetry_core.validation import dtype_name

__all__ = [
    "BACKEND_ENV",
    "REFERENCE",
    "BackendFallbackWarning",
    "CallSpec",
    "Candidate",
    "Check",
    "Implementation",
    "KernelFailure",
    "Operation",
    "QuietReason",
    "Selection",
    "SelectionRecorder",
    "get_operation",
    "kernel_failures",
    "last_selection",
    "operations",
    "record_selections",
    "requires_dtypes",
    "requires_min_capability",
    "requires_module",
    "reset_fallback_warnings",
    "reset_kernel_failures",
]

BACKEND_ENV = "LLAMATELEMETRY_BACKEND"
REFERENCE = "reference"


class BackendFallbackWarning(UserWarning):
    """A faster implementation could not run and a slower one was used instead."""


@dataclass(frozen=True)
class CallSpec:
    """What an implementation needs to know about a call to say whether it supports it.

    ``device`` is the device the call's tensors live on (simulated when a device is being simulated);
    ``dtype`` the dtype of its main input; ``shapes`` the shapes of its tensor arguments in order; ``attrs``
    any other facts an implementation may check (``causal``, ``head_dim``, ...).
    """

    device: DeviceInfo
    dtype: torch.dtype | None = None
    shapes: tuple[tuple[int, ...], ...] = ()
    attrs: Mapping[str, object] = field(default_factory=dict)

    @classmethod
    def from_tensors(cls, *tensors: torch.Tensor, **attrs: object) -> CallSpec:
        """Describe a call by its tensors: the first one gives the device and the dtype."""
        if not tensors:
            raise ConfigurationError("expected at least one tensor to describe a call, got none")
        first = tensors[0]
        return cls(
            device=get_device_info(first.device, refresh_memory=False),
            dtype=first.dtype,
            shapes=tuple(tuple(t.shape) for t in tensors),
            attrs=attrs,
        )

    @classmethod
    def for_device(
        cls, device: DeviceInfo | None = None, dtype: torch.dtype | None = None, **attrs: object
    ) -> CallSpec:
        """Describe a typical call on a device without tensors (what ``doctor`` asks about)."""
        info = device if device is not None else get_device_info()
        if dtype is None:
            dtype = torch.float16 if info.is_cuda else torch.float32
        return cls(device=info, dtype=dtype, attrs=attrs)


class QuietReason(str):
    """A reason an implementation cannot run that is not worth a warning: an optional package left out on purpose.

    Dispatch skips such an implementation silently; :meth:`Operation.explain` and :class:`Selection` still show
    the reason.
    """

    __slots__ = ()


Check = Callable[[CallSpec], "str | None"]
"""A support check: ``None`` when the call is supported, else the reason it is not."""


def requires_min_capability(major: int, minor: int = 0) -> Check:
    """A check that passes on CUDA devices of compute capability >= ``major.minor``."""

    def check(call: CallSpec) -> str | None:
        if call.device.is_cuda and not call.device.capability_at_least(major, minor):
            cc = call.device.compute_capability
            got = "unknown" if cc is None else f"{cc[0]}.{cc[1]}"
            return f"needs compute capability >= {major}.{minor}, {call.device.name} has {got}"
        return None

    return check


def requires_dtypes(*dtypes: torch.dtype) -> Check:
    """A check that passes when the call's dtype is one of ``dtypes``."""
    allowed = frozenset(dtypes)

    def check(call: CallSpec) -> str | None:
        if call.dtype is not None and call.dtype not in allowed:
            names = ", ".join(sorted(dtype_name(d) for d in allowed))
            return f"supports dtypes {{{names}}}, not {dtype_name(call.dtype)}"
        return None

    return check


_module_cache: dict[str, bool] = {}


def requires_module(module: str, install: str, *, optional: bool = False) -> Check:
    """A check that passes when ``module`` can be imported; its reason says how to install it.

    ``optional=True`` marks the package as an optional extra: its absence is a :class:`QuietReason`.
    """

    def check(call: CallSpec) -> str | None:
        found = _module_cache.get(module)
        if found is None:
            found = importlib.util.find_spec(module) is not None
            _module_cache[module] = found
        if found:
            return None
        reason = f"{module} is not installed ({install})"
        return QuietReason(reason) if optional else reason

    return check


@dataclass(frozen=True)
class Implementation:
    """One way to compute an operation."""

    name: str
    fn: Callable[..., Any]
    priority: int
    devices: frozenset[str] | Callable[[], frozenset[str]]
    checks: tuple[Check, ...] = ()

    def device_kinds(self) -> frozenset[str]:
        return self.devices() if callable(self.devices) else self.devices

    def unsupported_reason(self, call: CallSpec) -> str | None:
        """Why this implementation cannot run ``call`` (``None``: it can)."""
        kinds = self.device_kinds()
        if call.device.kind not in kinds:
            return f"runs on {', '.join(sorted(kinds)) or 'no device here'}, not {call.device.kind}"
        for check in self.checks:
            reason = check(call)
            if reason is not None:
                return reason
        return None

    def applies_to(self, call: CallSpec) -> bool:
        return call.device.kind in self.device_kinds()


@dataclass(frozen=True)
class Candidate:
    """One implementation and whether it supports a given call (``reason`` is ``None`` when it does)."""

    name: str
    priority: int
    reason: str | None


@dataclass(frozen=True)
class Selection:
    """The outcome of one dispatch: which implementation ran, whether it was requested, what was skipped."""

    operation: str
    implementation: str
    requested: bool
    skipped: tuple[tuple[str, str], ...] = ()


class SelectionRecorder:
    """Collects the :class:`Selection` of every dispatch inside a :func:`record_selections` block."""

    def __init__(self) -> None:
        self.selections: list[Selection] = []

    def implementations(self, operation: str) -> list[str]:
        """Names of the implementations that ran for ``operation``, in call order."""
        return [s.implementation for s in self.selections if s.operation == operation]

    def last(self, operation: str) -> str:
        """Name of the implementation that ran last for ``operation``; ``KeyError`` when it never ran."""
        names = self.implementations(operation)
        if not names:
            seen = sorted({s.operation for s in self.selections})
            raise KeyError(f"operation {operation!r} was not dispatched in this block; dispatched: {seen}")
        return names[-1]


_registry_lock = threading.Lock()
_operations: dict[str, Operation] = {}
_last: dict[str, Selection] = {}
_warned: set[tuple[str, str, str]] = set()
_recorders: contextvars.ContextVar[tuple[SelectionRecorder, ...]] = contextvars.ContextVar(
    "llamatelemetry_recorders", default=()
)


@contextlib.contextmanager
def record_selections() -> Iterator[SelectionRecorder]:
    """Record every dispatch made in this block (this thread or task, nested blocks included)."""
    recorder = SelectionRecorder()
    token = _recorders.set((*_recorders.get(), recorder))
    try:
        yield recorder
    finally:
        _recorders.reset(token)


def last_selection(operation: str) -> Selection | None:
    """The latest dispatch of ``operation`` in this process, or ``None`` when it never ran."""
    with _registry_lock:
        return _last.get(operation)


def reset_fallback_warnings() -> None:
    """Forget which fallbacks were already warned about, so the next one warns again (for tests)."""
    with _registry_lock:
        _warned.clear()


def operations() -> dict[str, Operation]:
    """Every registered operation by name (components register theirs when imported)."""
    with _registry_lock:
        return dict(_operations)


def get_operation(name: str) -> Operation:
    """The registered operation ``name``; ``KeyError`` listing the registered ones otherwise."""
    with _registry_lock:
        op = _operations.get(name)
        if op is None:
            raise KeyError(f"no operation named {name!r}; registered: {sorted(_operations)}")
        return op


def _warn_once(operation: str, implementation: str, reason: str, used: str) -> None:
    key = (operation, implementation, reason)
    with _registry_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(
        f"{operation}: {implementation!r} cannot run here ({reason}); using {used!r} instead. "
        f"Set {BACKEND_ENV}={operation}={used} to choose it explicitly and silence this warning.",
        BackendFallbackWarning,
        stacklevel=4,
    )


def _parse_backend_env(value: str) -> tuple[str | None, dict[str, str]]:
    """``"triton"`` -> ("triton", {}); ``"a=x,b=y"`` -> (None, {"a": "x", "b": "y"})."""
    value = value.strip()
    if not value:
        return None, {}
    if "=" not in value:
        return value, {}
    pairs: dict[str, str] = {}
    for item in value.split(","):
        op, sep, impl = item.partition("=")
        if not sep or not op.strip() or not impl.strip():
            raise ConfigurationError(
                f"expected {BACKEND_ENV} to be one implementation name or 'operation=implementation' pairs "
                f"separated by commas, got {value!r}"
            )
        pairs[op.strip()] = impl.strip()
    return None, pairs


class Operation:
    """An operation with a reference implementation and optional faster ones; see the module docstring."""

    def __init__(self, name: str, reference: Callable[..., Any], *, replace: bool = False) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._impls: dict[str, Implementation] = {
            REFERENCE: Implementation(REFERENCE, reference, priority=-(2**31), devices=frozenset({"cpu", "cuda"}))
        }
        self._ranked: tuple[Implementation, ...] = tuple(self._impls.values())
        with _registry_lock:
            if name in _operations and not replace:
                raise ConfigurationError(
                    f"an operation named {name!r} is already registered; pass replace=True to redefine it"
                )
            _operations[name] = self

    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        priority: int,
        devices: Collection[str] | Callable[[], frozenset[str]],
        checks: Collection[Check] = (),
        replace: bool = False,
    ) -> Implementation:
        """Add an implementation; a taken name raises unless ``replace=True``."""
        if name == REFERENCE:
            raise ConfigurationError(f"{self.name}: the name {REFERENCE!r} is kept for the reference implementation")
        kinds = devices if callable(devices) else frozenset(devices)
        impl = Implementation(name, fn, priority, kinds, tuple(checks))
        with self._lock:
            if name in self._impls and not replace:
                raise ConfigurationError(
                    f"{self.name}: an implementation named {name!r} is already registered; pass replace=True"
                )
            self._impls[name] = impl
            self._ranked = tuple(sorted(self._impls.values(), key=lambda i: i.priority, reverse=True))
        return impl

    @property
    def implementations(self) -> list[Implementation]:
        """All implementations, best (highest priority) first; the reference is last."""
        return list(self._ranked)

    def implementation(self, name: str) -> Implementation:
        with self._lock:
            impl = self._impls.get(name)
            if impl is None:
                raise ConfigurationError(
                    f"{self.name} has no implementation {name!r}; choose one of {sorted(self._impls)}"
                )
            return impl

    def explain(self, call: CallSpec) -> list[Candidate]:
        """Every implementation, best first, with the reason it cannot run ``call`` (``None``: it can)."""
        return [Candidate(i.name, i.priority, self._reason(i, call)) for i in self.implementations]

    def requested_backend(self, backend: str | None = None) -> str | None:
        """The implementation asked for by argument or environment, or ``None`` for automatic choice."""
        if backend is not None:
            return backend
        name, pairs = _parse_backend_env(os.environ.get(BACKEND_ENV, ""))
        if pairs:
            return pairs.get(self.name)
        if name is not None and name in self._impls:
            return name
        return None

    def _requested_implementation(self, call: CallSpec, backend: str | None) -> Implementation | None:
        """The explicitly requested implementation, checked against ``call``; ``None`` for automatic choice."""
        requested = self.requested_backend(backend)
        if requested is None:
            return None
        impl = self.implementation(requested)
        reason = impl.unsupported_reason(call)
        if reason is not None:
            raise self._unavailable(impl, reason)
        return impl

    def select(self, call: CallSpec, backend: str | None = None) -> Implementation:
        """The implementation dispatch would run for ``call`` first (no warning is issued)."""
        requested = self._requested_implementation(call, backend)
        if requested is not None:
            return requested
        for impl in self._ranked:
            if self._reason(impl, call) is None:
                return impl
        raise AssertionError("the reference implementation supports every call")  # pragma: no cover

    def _reason(self, impl: Implementation, call: CallSpec) -> str | None:
        """Why ``impl`` is not chosen for ``call``: it does not support it, or its kernel failed to build here."""
        reason = impl.unsupported_reason(call)
        if reason is None:
            failure = recorded_failure(self.name, impl.name, call.device, call.dtype)
            if failure is not None:
                return failure.reason
        return reason

    def _record_build_failure(self, impl: Implementation, call: CallSpec, exc: Exception) -> str | None:
        """Record ``exc`` if it is a build failure of ``impl`` (an environment fact); its reason, else ``None``."""
        error = build_failure_reason(exc)
        if error is None:
            return None
        return record_failure(self.name, impl.name, call.device, call.dtype, error).reason

    def _unavailable(self, impl: Implementation, reason: str) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"{self.name}: the requested implementation {impl.name!r} cannot run this call: {reason}. "
            f"Request another (one of {sorted(self._impls)}) or none, to let llamatelemetry choose",
            operation=self.name,
            backend=impl.name,
        )

    def _record(self, selection: Selection) -> None:
        with _registry_lock:
            _last[self.name] = selection
        for recorder in _recorders.get():
            recorder.selections.append(selection)

    def dispatch(self, call: CallSpec, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        """Run the best implementation supporting ``call`` on ``args``; see the module docstring."""
        requested = self._requested_implementation(call, backend)
        if requested is not None:
            self._record(Selection(self.name, requested.name, requested=True))
            try:
                return requested.fn(*args, **kwargs)
            except Exception as exc:
                reason = self._record_build_failure(requested, call, exc)
                if reason is None or isinstance(exc, BackendUnavailableError):
                    raise
                raise self._unavailable(requested, reason) from exc

        skipped: list[tuple[str, str]] = []
        to_warn: list[tuple[str, str]] = []
        for impl in self._ranked:
            reason = self._reason(impl, call)
            if reason is not None:
                skipped.append((impl.name, str(reason)))
                if impl.applies_to(call) and not isinstance(reason, QuietReason):
                    to_warn.append((impl.name, reason))
                continue
            try:
                result = impl.fn(*args, **kwargs)
            except Exception as exc:
                if impl.name == REFERENCE:
                    raise
                reason = self._record_build_failure(impl, call, exc)
                if reason is None:
                    if not isinstance(exc, BackendUnavailableError):
                        raise
                    reason = str(exc)
                skipped.append((impl.name, reason))
                to_warn.append((impl.name, reason))
                continue
            for name, why in to_warn:
                _warn_once(self.name, name, why, impl.name)
            self._record(Selection(self.name, impl.name, requested=False, skipped=tuple(skipped)))
            return result
        raise AssertionError("the reference implementation supports every call")  # pragma: no cover

    def __repr__(self) -> str:
        return f"Operation({self.name!r}, implementations={[i.name for i in self.implementations]})"
