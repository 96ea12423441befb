"""Choosing an implementation of an operation, the same way for every operation.

Each operation (``Operation``) has a pure-PyTorch *reference*: the specification, the CPU fallback and the test
oracle. Faster implementations (Triton, flash-attn, SDPA, ...) register beside it with a priority and declare
what they support: the device kinds they run on and checks over the call (capability, dtypes, shapes, installed
packages). Dispatch takes the highest-priority implementation that supports the call:

* An implementation whose device kind does not match the call is simply not applicable (a Triton kernel for a
  CPU tensor): nothing is said.
* A better implementation that targets this device but cannot run the call is skipped, and the reason is
  recorded (:func:`last_selection`, :meth:`Operation.explain`). Choosing for the user is not worth a warning: a
  dtype, a shape or a capability the implementation does not support is skipped silently. Only a
  :class:`NoticeReason` warns, once per reason: a package the implementation needs is not installed (the device
  could do better with it; :func:`requires_module`), or its kernel failed to build here. An optional extra left
  out on purpose answers with a :class:`QuietReason` and is never warned about.
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
``operation=implementation`` pairs, which are strict. A name in it that no registered operation knows (a typo
such as ``sofmax=triton``) is reported once per value with a :class:`BackendEnvWarning` listing the valid names.

The variable is read once, at the first dispatch; :func:`reload_environment` reads it again (a test that sets it
calls that). Dispatch remembers its choice per call key (the device, dtype, shapes and facts of the call, the
``backend=`` argument, and the device kinds of implementations that depend on the process, such as Triton's
interpreter): a call whose implementation is already chosen costs a dictionary lookup. The memory is forgotten
when an implementation is registered, when a kernel failure is recorded or reset, and by
:func:`reset_selection_cache`.

An implementation's checks all run and every reason it cannot run a call is reported (joined by ``"; "``),
except that a failed *gate* (:func:`~llamatelemetry_core.callspec.gate`, such as :func:`requires_module`) or a
:class:`QuietReason` ends the list.

Which implementation ran is observable: :func:`last_selection` for the latest call of an operation and
:func:`record_selections` for every call inside a block.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llamatelemetry_core import build_failures
from llamatelemetry_core.backend_env import (
    BACKEND_ENV,
    check_devices,
    check_priority,
    load_operation_providers,
    parse_backend_env,
    unknown_backend_names,
)
from llamatelemetry_core.build_failures import (
    KernelFailure,
    build_failure_reason,
    kernel_failures,
    record_failure,
    recorded_failure,
    reset_kernel_failures,
)
from llamatelemetry_core.callspec import (
    CallSpec,
    Check,
    NoticeReason,
    QuietReason,
    combine_reasons,
    gate,
    is_gate,
    requires_dtypes,
    requires_min_capability,
    requires_module,
    selection_key,
)
from llamatelemetry_core.device import get_device_info, reload_simulation_env
from llamatelemetry_core.environment import reload_launch_env
from llamatelemetry_core.errors import BackendUnavailableError, ConfigurationError
from llamatelemetry_core.recording import (
    Selection,
    SelectionRecorder,
    alias_of,
    canonical_operation_name,
    last_selection,
    record_selection,
    record_selections,
    set_alias,
)

__all__ = [
    "BACKEND_ENV",
    "REFERENCE",
    "BackendEnvWarning",
    "BackendFallbackWarning",
    "CallSpec",
    "Candidate",
    "Check",
    "Implementation",
    "KernelFailure",
    "NoticeReason",
    "Operation",
    "QuietReason",
    "Selection",
    "SelectionRecorder",
    "gate",
    "get_operation",
    "kernel_failures",
    "last_selection",
    "operations",
    "record_selections",
    "reload_environment",
    "requires_dtypes",
    "requires_min_capability",
    "requires_module",
    "reset_fallback_warnings",
    "reset_kernel_failures",
    "reset_selection_cache",
]


REFERENCE = "reference"


class BackendFallbackWarning(UserWarning):
    """A faster implementation could not run for a reason of the environment (a missing package, a kernel that
    failed to build, a run-time failure it reported) and a slower one was used instead."""


class BackendEnvWarning(UserWarning):
    """``LLAMATELEMETRY_BACKEND`` names an operation or implementation that no registered operation has."""


@dataclass(frozen=True)
class Implementation:
    """One way to compute an operation."""

    name: str
    fn: Callable[..., Any]
    priority: int
    devices: frozenset[str] | Callable[[], frozenset[str]]
    checks: tuple[Check, ...] = ()
    traced: Callable[..., Any] | None = None  # what torch.compile traces instead of fn (see llamatelemetry_core.traced)

    def device_kinds(self) -> frozenset[str]:
        return self.devices() if callable(self.devices) else self.devices

    def unsupported_reasons(self, call: CallSpec) -> list[str]:
        """Every reason this implementation cannot run ``call`` (empty: it can); see the module docstring.

        A device kind it does not run on is the only reason given (its checks assume its devices).
        """
        kinds = self.device_kinds()
        if call.device.kind not in kinds:
            return [f"runs on {', '.join(sorted(kinds)) or 'no device here'}, not {call.device.kind}"]
        reasons: list[str] = []
        for check in self.checks:
            reason = check(call)
            if reason is not None:
                reasons.append(reason)
                if isinstance(reason, QuietReason) or is_gate(check):
                    break
        return reasons

    def unsupported_reason(self, call: CallSpec) -> str | None:
        """Why this implementation cannot run ``call``, every reason in one string (``None``: it can)."""
        return combine_reasons(self.unsupported_reasons(call))

    def applies_to(self, call: CallSpec) -> bool:
        return call.device.kind in self.device_kinds()


@dataclass(frozen=True)
class Candidate:
    """One implementation and whether it supports a given call (``reason`` is ``None`` when it does)."""

    name: str
    priority: int
    reason: str | None


_registry_lock = threading.Lock()
_operations: dict[str, Operation] = {}
_warned: set[tuple[str, str, str]] = set()
_env_checked: set[str] = set()


def reset_fallback_warnings() -> None:
    """Forget which fallbacks were already warned about, so the next one warns again (for tests)."""
    with _registry_lock:
        _warned.clear()
        _env_checked.clear()


_env: list[tuple[str, str | None, dict[str, str]] | None] = [None]  # LLAMATELEMETRY_BACKEND, parsed once
_CACHE_LIMIT = 4096  # distinct call keys remembered per operation (decode shapes grow: the memory is bounded)


def _backend_env() -> tuple[str, str | None, dict[str, str]]:
    """The variable's value and its parse: (value, one name or None, operation=implementation pairs)."""
    parsed = _env[0]
    if parsed is None:
        value = os.environ.get(BACKEND_ENV, "")
        parsed = (value, *parse_backend_env(value))
        _env[0] = parsed
    return parsed


def reset_selection_cache() -> None:
    """Forget every remembered choice of implementation and read ``LLAMATELEMETRY_BACKEND`` (and
    ``LLAMATELEMETRY_SIMULATE_DEVICE``) again.

    Call it after changing the variable (or anything a support check reads, or ``LLAMATELEMETRY_PDL``) in a
    running process; tests that set the variable call it.
    """
    reload_simulation_env()
    reload_launch_env()
    with _registry_lock:
        _env[0] = None
        ops = list(_operations.values())
    for op in ops:
        op._cache.clear()


def reload_environment() -> None:
    """Read ``LLAMATELEMETRY_BACKEND`` again (and forget remembered choices): :func:`reset_selection_cache`."""
    reset_selection_cache()


def operations() -> dict[str, Operation]:
    """Every registered operation by name (components register theirs when imported)."""
    with _registry_lock:
        return dict(_operations)


def get_operation(name: str) -> Operation:
    """The registered operation ``name``; ``KeyError`` listing the registered ones otherwise."""
    with _registry_lock:
        op = _operations.get(canonical_operation_name(name))
        if op is None:
            raise KeyError(f"no operation named {name!r}; registered: {sorted(_operations)}")
        return op


def _worth_a_warning(reason: str) -> bool:
    """Whether a skip for ``reason`` is announced: only reasons of the environment are (see the module docstring)."""
    return isinstance(reason, NoticeReason)


def _warn_once(operation: str, implementation: str, reason: str, used: str, stacklevel: int = 4) -> None:
    # A notice (a missing package, a failed build) is given once for the process, not once per operation.
    key = ("", "", reason) if isinstance(reason, NoticeReason) else (operation, implementation, reason)
    with _registry_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(
        f"{operation}: {implementation!r} cannot run here ({reason}); using {used!r} instead. "
        f"Set {BACKEND_ENV}={operation}={used} to choose it explicitly and silence this warning.",
        BackendFallbackWarning,
        stacklevel=stacklevel,
    )


def _unknown_backend_names(value: str) -> str | None:
    """What in ``value`` (the variable) names nothing registered, with the valid names; ``None`` when all is known."""
    with _registry_lock:
        ops = dict(_operations)
    known = {name: [i.name for i in op.implementations] for name, op in ops.items()}
    for op in ops.values():
        for alias in op.aliases:
            known[alias] = known[op.name]
    return unknown_backend_names(value, known)


def _check_backend_env(value: str) -> None:
    """Warn once per value of the variable about names that match nothing registered."""
    if not value.strip() or value in _env_checked:
        return
    with _registry_lock:
        if value in _env_checked:
            return
        _env_checked.add(value)
    problem = _unknown_backend_names(value)
    if problem is not None:
        load_operation_providers()  # the name may belong to a component that is installed but not imported yet
        problem = _unknown_backend_names(value)
    if problem is not None:
        warnings.warn(
            f"{BACKEND_ENV}={value!r}: {problem}. Those entries are ignored; fix the spelling, or unset the variable",
            BackendEnvWarning,
            stacklevel=5,
        )


@dataclass(frozen=True)
class _Plan:
    """What dispatch chose for one call key: the implementation, its place in the ranking and what it recorded."""

    impl: Implementation
    index: int
    selection: Selection
    to_warn: tuple[tuple[str, str], ...]
    device: object  # keeps the call's device alive: the key holds its id


def _described(tensors: Sequence[torch.Tensor], facts: Hashable | None, call_dtype: torch.dtype | None) -> CallSpec:
    """The :class:`CallSpec` that :meth:`Operation.run` skipped building on its hot path."""
    call = CallSpec.from_tensors(*tensors, facts=facts)
    return call if call_dtype is None else CallSpec(call.device, call_dtype, call.shapes, facts=facts)


class Operation:
    """An operation with a reference implementation and optional faster ones; see the module docstring."""

    def __init__(
        self, name: str, reference: Callable[..., Any], *, replace: bool = False, aliases: Collection[str] = ()
    ) -> None:
        self.name = name
        self.aliases = tuple(aliases)  # former names, still accepted wherever an operation is named
        self._lock = threading.Lock()
        self._impls: dict[str, Implementation] = {
            REFERENCE: Implementation(REFERENCE, reference, priority=-(2**31), devices=frozenset({"cpu", "cuda"}))
        }
        self._ranked: tuple[Implementation, ...] = tuple(self._impls.values())
        self._dynamic: tuple[Implementation, ...] = ()  # implementations whose device kinds are asked per call
        self._cache: dict[Hashable, _Plan] = {}
        with _registry_lock:
            if name in _operations and not replace:
                raise ConfigurationError(
                    f"an operation named {name!r} is already registered; pass replace=True to redefine it"
                )
            if alias_of(name) is not None and not replace:
                raise ConfigurationError(
                    f"{name!r} is a former name of the operation {alias_of(name)!r} (an alias); choose another name"
                )
            for alias in self.aliases:
                taken = _operations.get(alias) is not None or alias_of(alias) not in (None, name)
                if taken and not replace:
                    raise ConfigurationError(f"{name}: the alias {alias!r} already names another operation")
            _operations[name] = self
            for alias in self.aliases:
                set_alias(alias, name)

    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        priority: int,
        devices: Collection[str] | Callable[[], frozenset[str]],
        checks: Collection[Check] = (),
        replace: bool = False,
        traced: Callable[..., Any] | None = None,
    ) -> Implementation:
        """Add an implementation; a taken name raises unless ``replace=True``.

        ``devices`` is a device kind (``"cuda"``), a collection of kinds, or a callable returning a frozenset of
        kinds (asked at each dispatch). ``traced`` is what ``torch.compile`` traces in place of ``fn`` (a custom op
        around a kernel launcher); without it ``fn`` must be traceable. Every argument is checked before anything
        changes: a call that raises
        :class:`ConfigurationError` (or ``TypeError`` for a non-callable ``fn``) leaves the operation as it was.
        """
        given_name: object = name  # validated at run time whatever the annotation says
        if not isinstance(given_name, str) or not given_name:
            raise ConfigurationError(f"{self.name}: expected name to be a non-empty string, got {name!r}")
        if name == REFERENCE:
            raise ConfigurationError(f"{self.name}: the name {REFERENCE!r} is kept for the reference implementation")
        if not callable(fn):
            raise TypeError(f"{self.name}: expected fn to be callable, got {type(fn).__name__}")
        rank = check_priority(priority, self.name)
        kinds = check_devices(devices, self.name)
        given_checks: object = checks
        if isinstance(given_checks, str | bytes) or not isinstance(given_checks, Collection):
            raise ConfigurationError(f"{self.name}: expected checks to be a collection of callables, got {checks!r}")
        if not all(callable(c) for c in checks):
            raise ConfigurationError(f"{self.name}: expected every check to be callable, got {list(checks)!r}")
        if traced is not None and not callable(traced):
            raise TypeError(f"{self.name}: expected traced to be callable or None, got {type(traced).__name__}")
        impl = Implementation(name, fn, rank, kinds, tuple(checks), traced)
        with self._lock:
            if name in self._impls and not replace:
                raise ConfigurationError(
                    f"{self.name}: an implementation named {name!r} is already registered; pass replace=True"
                )
            self._impls[name] = impl
            self._ranked = tuple(sorted(self._impls.values(), key=lambda i: i.priority, reverse=True))
            self._dynamic = tuple(i for i in self._ranked if callable(i.devices))
            self._cache.clear()
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

    def registered(self, name: str) -> Implementation:
        """The implementation ``name``, read without the lock (so that ``torch.compile`` can trace it)."""
        impl = self._impls.get(name)
        if impl is None:
            raise ConfigurationError(f"{self.name} has no implementation {name!r}; choose one of {sorted(self._impls)}")
        return impl

    def explain(self, call: CallSpec) -> list[Candidate]:
        """Every implementation, best first, with the reason it cannot run ``call`` (``None``: it can)."""
        return [Candidate(i.name, i.priority, self._reason(i, call)) for i in self.implementations]

    def requested_backend(self, backend: str | None = None) -> str | None:
        """The implementation asked for by argument or environment, or ``None`` for automatic choice."""
        if backend is not None:
            return backend
        value, name, pairs = _backend_env()
        _check_backend_env(value)
        if pairs:
            chosen = pairs.get(self.name)
            for alias in self.aliases:
                if chosen is None:
                    chosen = pairs.get(alias)
            return chosen
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
                return NoticeReason(failure.reason)
        return reason

    def _record_build_failure(self, impl: Implementation, call: CallSpec, exc: Exception) -> str | None:
        """Record ``exc`` if it is a build failure of ``impl`` (an environment fact); its reason, else ``None``."""
        error = build_failure_reason(exc)
        if error is None:
            return None
        return NoticeReason(record_failure(self.name, impl.name, call.device, call.dtype, error).reason)

    def _unavailable(self, impl: Implementation, reason: str) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"{self.name}: the requested implementation {impl.name!r} cannot run this call: {reason}. "
            f"Request another (one of {sorted(self._impls)}) or none, to let llamatelemetry choose",
            operation=self.name,
            backend=impl.name,
        )

    def _cache_key(self, call: CallSpec, backend: str | None) -> Hashable:
        return self._key(backend, call.selection_key())

    def _key(self, backend: str | None, selection: Hashable) -> Hashable:
        """The memory's key: the call's selection key, and what else selection read (kernel failures, and the
        device kinds of implementations that depend on the process)."""
        kinds = tuple(i.device_kinds() for i in self._dynamic) if self._dynamic else ()
        return (backend, selection, build_failures.failures_generation(), kinds)

    def _plan(self, call: CallSpec, backend: str | None) -> _Plan:
        """Choose without running: the requested implementation (or raise), else the best that supports ``call``."""
        requested = self._requested_implementation(call, backend)
        if requested is not None:
            return _Plan(requested, -1, Selection(self.name, requested.name, requested=True), (), call.device)
        skipped: list[tuple[str, str]] = []
        to_warn: list[tuple[str, str]] = []
        for index, impl in enumerate(self._ranked):
            reason = self._reason(impl, call)
            if reason is None:
                selection = Selection(self.name, impl.name, requested=False, skipped=tuple(skipped))
                return _Plan(impl, index, selection, tuple(to_warn), call.device)
            skipped.append((impl.name, str(reason)))
            if impl.applies_to(call) and _worth_a_warning(reason):
                to_warn.append((impl.name, reason))
        raise AssertionError("the reference implementation supports every call")  # pragma: no cover

    def run(
        self,
        tensors: Sequence[torch.Tensor],
        *args: Any,
        facts: Hashable | None = None,
        backend: str | None = None,
        call_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> Any:
        """:meth:`dispatch` for the call ``tensors`` describe (as :meth:`CallSpec.from_tensors` would, with
        ``call_dtype`` in place of the first tensor's dtype when given), building the :class:`CallSpec` only
        when the choice is not remembered yet: the hot path of every public operation.
        """
        first = tensors[0]
        device = get_device_info(first.device, refresh_memory=False)
        dtype = first.dtype if call_dtype is None else call_dtype
        shapes = tuple([tuple(t.shape) for t in tensors])
        key: Hashable | None = self._key(backend, selection_key(device, dtype, shapes, facts))
        try:
            plan = self._cache.get(key)
        except TypeError:  # a fact that cannot be hashed: choose afresh at every call
            key, plan = None, None
        if plan is None:
            call = CallSpec(device=device, dtype=dtype, shapes=shapes, facts=facts)
            plan = self._remember(key, call, backend)
            return self._execute(plan, call, args, kwargs)
        return self._execute(plan, None, args, kwargs, tensors, facts, call_dtype)

    def dispatch(self, call: CallSpec, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        """Run the best implementation supporting ``call`` on ``args``; see the module docstring."""
        key: Hashable | None = self._cache_key(call, backend)
        try:
            plan = self._cache.get(key)
        except TypeError:  # a fact that cannot be hashed: choose afresh at every call
            key, plan = None, None
        if plan is None:
            plan = self._remember(key, call, backend)
        return self._execute(plan, call, args, kwargs)

    def _remember(self, key: Hashable | None, call: CallSpec, backend: str | None) -> _Plan:
        plan = self._plan(call, backend)
        if key is not None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = plan
        return plan

    def _execute(
        self,
        plan: _Plan,
        call: CallSpec | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        tensors: Sequence[torch.Tensor] = (),
        facts: Hashable | None = None,
        call_dtype: torch.dtype | None = None,
    ) -> Any:
        """Run ``plan`` (``call`` is built from ``tensors`` only if an implementation fails and another is tried)."""
        impl = plan.impl
        if plan.index < 0:
            record_selection(plan.selection)
            try:
                return impl.fn(*args, **kwargs)
            except Exception as exc:
                reason = self._record_build_failure(impl, call or _described(tensors, facts, call_dtype), exc)
                if reason is None or isinstance(exc, BackendUnavailableError):
                    raise
                raise self._unavailable(impl, reason) from exc
        try:
            result = impl.fn(*args, **kwargs)
        except Exception as exc:
            if impl.name == REFERENCE:
                raise
            reason = self._record_build_failure(impl, call or _described(tensors, facts, call_dtype), exc)
            if reason is None:
                if not isinstance(exc, BackendUnavailableError):
                    raise
                reason = str(exc)
            skipped = [*plan.selection.skipped, (impl.name, reason)]
            call = call or _described(tensors, facts, call_dtype)
            return self._run_from(plan.index + 1, call, skipped, [*plan.to_warn, (impl.name, reason)], args, kwargs)
        for name, why in plan.to_warn:
            _warn_once(self.name, name, why, impl.name)
        record_selection(plan.selection)
        return result

    def _run_from(
        self,
        start: int,
        call: CallSpec,
        skipped: list[tuple[str, str]],
        to_warn: list[tuple[str, str]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """After an implementation failed at run time: try the next ones in rank order (not remembered)."""
        for impl in self._ranked[start:]:
            reason = self._reason(impl, call)
            if reason is not None:
                skipped.append((impl.name, str(reason)))
                if impl.applies_to(call) and _worth_a_warning(reason):
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
                _warn_once(self.name, name, why, impl.name, stacklevel=5)
            record_selection(Selection(self.name, impl.name, requested=False, skipped=tuple(skipped)))
            return result
        raise AssertionError("the reference implementation supports every call")  # pragma: no cover

    def __repr__(self) -> str:
        return f"Operation({self.name!r}, implementations={[i.name for i in self.implementations]})"
