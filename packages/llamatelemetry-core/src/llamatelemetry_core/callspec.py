"""What an implementation is told about a call (:class:`CallSpec`), and the support checks it runs over it.

A check returns ``None`` when it supports the call, else the reason it does not. An operation runs every check
of an implementation and reports every reason (so ``explain`` and a :class:`BackendUnavailableError` list all
that stands in the way), except after a *gate*: a check whose failure makes the remaining ones meaningless (a
package that is not installed, whose own checks would need it) stops the list there.

Per-operation facts of a call (head counts, causality, a kernel's unsupported case) travel typed: ``facts`` holds
a frozen dataclass of the operation's own (``flashattn``'s ``AttentionCall`` for instance), read by
:meth:`CallSpec.facts_as`. The older string map ``attrs`` is still accepted and read by name.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import dtype_name

__all__ = [
    "CallSpec",
    "Check",
    "NoticeReason",
    "QuietReason",
    "combine_reasons",
    "gate",
    "is_gate",
    "requires_dtypes",
    "requires_min_capability",
    "requires_module",
    "selection_key",
]

FactsT = TypeVar("FactsT")


@dataclass(frozen=True)
class CallSpec:
    """What an implementation needs to know about a call to say whether it supports it.

    ``device`` is the device the call's tensors live on (simulated when a device is being simulated);
    ``dtype`` the dtype of its main input; ``shapes`` the shapes of its tensor arguments in order; ``facts`` a
    frozen, hashable dataclass of the operation's own facts (typed; read with :meth:`facts_as`); ``attrs`` any
    other facts by name (the older, untyped form, kept for callers that use it).
    """

    device: DeviceInfo
    dtype: torch.dtype | None = None
    shapes: tuple[tuple[int, ...], ...] = ()
    attrs: Mapping[str, object] = field(default_factory=dict)
    facts: Hashable | None = None

    def facts_as(self, kind: type[FactsT]) -> FactsT | None:
        """``facts`` when it is a ``kind``; ``None`` when the call carries none (``doctor``'s typical call).

        Raises :class:`ConfigurationError` when the call carries facts of another type (an operation was
        handed another operation's call description).
        """
        facts = self.facts
        if facts is None:
            return None
        if not isinstance(facts, kind):
            raise ConfigurationError(
                f"expected the call's facts to be a {kind.__name__}, got {type(facts).__name__}; describe the call "
                f"with the facts of the operation it is dispatched to"
            )
        return facts

    def selection_key(self) -> Hashable:
        """What selection depends on: device, dtype, shapes and facts (hashing it raises ``TypeError`` when a fact
        cannot be hashed). The device enters by identity: its facts are cached per device.

        Facts with a ``selection_class()`` method stand in for the shapes and themselves with what it returns: an
        operation whose checks read only its facts, and of them only some classes (a decode step, a prefill)
        rather than every length, is then chosen once per class instead of once per length.
        """
        attrs = tuple(self.attrs.items()) if self.attrs else ()
        return selection_key(self.device, self.dtype, self.shapes, self.facts, attrs)

    @classmethod
    def from_tensors(cls, *tensors: torch.Tensor, facts: Hashable | None = None, **attrs: object) -> CallSpec:
        """Describe a call by its tensors: the first one gives the device and the dtype."""
        if not tensors:
            raise ConfigurationError("expected at least one tensor to describe a call, got none")
        first = tensors[0]
        return cls(
            device=get_device_info(first.device, refresh_memory=False),
            dtype=first.dtype,
            shapes=tuple(tuple(t.shape) for t in tensors),
            attrs=attrs,
            facts=facts,
        )

    @classmethod
    def for_device(
        cls,
        device: DeviceInfo | None = None,
        dtype: torch.dtype | None = None,
        *,
        facts: Hashable | None = None,
        **attrs: object,
    ) -> CallSpec:
        """Describe a typical call on a device without tensors (what ``doctor`` asks about)."""
        info = device if device is not None else get_device_info()
        if dtype is None:
            dtype = torch.float16 if info.is_cuda else torch.float32
        return cls(device=info, dtype=dtype, attrs=attrs, facts=facts)


def selection_key(
    device: DeviceInfo,
    dtype: torch.dtype | None,
    shapes: tuple[tuple[int, ...], ...],
    facts: Hashable | None,
    attrs: tuple[tuple[str, object], ...] = (),
) -> Hashable:
    """:meth:`CallSpec.selection_key` of a call with these fields, for callers that have not built the
    :class:`CallSpec` (dispatch's hot path builds it only when the choice is not remembered)."""
    class_of = getattr(facts, "selection_class", None)
    if class_of is not None:
        return (id(device), dtype, class_of(), attrs)
    return (id(device), dtype, shapes, facts, attrs)


class QuietReason(str):
    """A reason an implementation cannot run that is not worth a warning: an optional package left out on purpose.

    Dispatch skips such an implementation silently; :meth:`Operation.explain` and :class:`Selection` still show
    the reason. A quiet reason also ends the list of reasons (what follows it is moot).
    """

    __slots__ = ()


class NoticeReason(str):
    """A reason worth telling the user about once: the environment, not the call, keeps an implementation out.

    A package the implementation needs is not installed (the device could do better with it), its kernel failed
    to build with the installed compiler, or the caller asked for it by name and the device lacks it (bf16 Tensor
    Cores requested on a T4). Every other reason (a dtype, a shape, a capability the call or device does not
    meet) is the library choosing for the user, recorded but not warned about.
    """

    __slots__ = ()


Check = Callable[[CallSpec], "str | None"]
"""A support check: ``None`` when the call is supported, else the reason it is not."""

_GATE_ATTR = "_llamatelemetry_gate"


def gate(check: Check) -> Check:
    """Mark ``check`` as a gate: when it fails, the implementation's later checks are not run (they need it)."""
    setattr(check, _GATE_ATTR, True)
    return check


def is_gate(check: Check) -> bool:
    """Whether ``check`` was marked with :func:`gate`."""
    return bool(getattr(check, _GATE_ATTR, False))


def combine_reasons(reasons: list[str]) -> str | None:
    """One reason from several (joined by ``"; "``): quiet only when every one of them is quiet, a notice when any
    one of them is."""
    if not reasons:
        return None
    if len(reasons) == 1:
        return reasons[0]
    joined = "; ".join(reasons)
    if all(isinstance(r, QuietReason) for r in reasons):
        return QuietReason(joined)
    return NoticeReason(joined) if any(isinstance(r, NoticeReason) for r in reasons) else joined


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
    """A check (a :func:`gate`) that passes when ``module`` can be imported; its reason says how to install it.

    Its absence is a :class:`NoticeReason` (dispatch warns once that installing it would do better), or, with
    ``optional=True`` (an optional extra the user may leave out on purpose), a :class:`QuietReason`.
    """

    def check(call: CallSpec) -> str | None:
        found = _module_cache.get(module)
        if found is None:
            found = importlib.util.find_spec(module) is not None
            _module_cache[module] = found
        if found:
            return None
        reason = f"{module} is not installed ({install})"
        return QuietReason(reason) if optional else NoticeReason(reason)

    return gate(check)
