"""Which implementation each dispatch ran: :func:`last_selection` for the latest call of an operation and
:func:`record_selections` for every call inside a block."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "Selection",
    "SelectionRecorder",
    "canonical_operation_name",
    "last_selection",
    "record_selection",
    "record_selections",
]

_aliases: dict[str, str] = {}  # an operation's former, unnamespaced name -> its name (filled by the registry)


def alias_of(alias: str) -> str | None:
    """The operation ``alias`` names, if it is an alias (the registry's bookkeeping)."""
    return _aliases.get(alias)


def set_alias(alias: str, name: str) -> None:
    """Make ``alias`` name the operation ``name`` (called by the registry when an operation registers)."""
    _aliases[alias] = name


def canonical_operation_name(name: str) -> str:
    """``name`` itself, or the namespaced name of the operation it is an alias of (``"flash_attention"`` ->
    ``"flashattn.attention"``)."""
    return _aliases.get(name, name)


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
        operation = canonical_operation_name(operation)
        return [s.implementation for s in self.selections if s.operation == operation]

    def last(self, operation: str) -> str:
        """Name of the implementation that ran last for ``operation``; ``KeyError`` when it never ran."""
        names = self.implementations(operation)
        if not names:
            seen = sorted({s.operation for s in self.selections})
            raise KeyError(f"operation {operation!r} was not dispatched in this block; dispatched: {seen}")
        return names[-1]


_last: dict[str, Selection] = {}
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
    return _last.get(canonical_operation_name(operation))


def record_selection(selection: Selection) -> None:
    """Note one dispatch's outcome (what ``Operation.dispatch`` calls; one dictionary store, no lock)."""
    _last[selection.operation] = selection
    for recorder in _recorders.get():
        recorder.selections.append(selection)
