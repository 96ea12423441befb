"""Reading ``LLAMATELEMETRY_BACKEND`` and validating what ``Operation.register`` is given (helpers of
:mod:`llamatelemetry_core.selection`, which documents the variable)."""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import cast

from llamatelemetry_core.errors import ConfigurationError

__all__ = [
    "BACKEND_ENV",
    "OPERATIONS_ENTRY_POINT",
    "check_devices",
    "check_priority",
    "load_operation_providers",
    "parse_backend_env",
    "unknown_backend_names",
]

BACKEND_ENV = "LLAMATELEMETRY_BACKEND"


def parse_backend_env(value: str) -> tuple[str | None, dict[str, str]]:
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


def unknown_backend_names(value: str, implementations: Mapping[str, Sequence[str]]) -> str | None:
    """What in ``value`` (the variable) names nothing in ``implementations`` (operation -> its implementations'
    names), with the valid names; ``None`` when all is known."""
    name, pairs = parse_backend_env(value)
    valid_ops = ", ".join(sorted(implementations)) or "none registered"
    problems: list[str] = []
    if name is not None:
        every = sorted({i for names in implementations.values() for i in names})
        if name not in every:
            problems.append(f"no registered operation has an implementation named {name!r} (known: {', '.join(every)})")
    for op_name, impl_name in pairs.items():
        names = implementations.get(op_name)
        if names is None:
            problems.append(f"no operation named {op_name!r} is registered (operations: {valid_ops})")
            continue
        if impl_name not in names:
            problems.append(
                f"operation {op_name!r} has no implementation {impl_name!r} (one of {', '.join(sorted(names))})"
            )
    return "; ".join(problems) or None


OPERATIONS_ENTRY_POINT = "llamatelemetry.operations"
"""Entry-point group naming the modules whose import registers a component's operations."""


def load_operation_providers() -> None:
    """Import every installed component's operation modules (a broken one is skipped: this only serves a warning)."""
    for entry in importlib.metadata.entry_points(group=OPERATIONS_ENTRY_POINT):
        with contextlib.suppress(Exception):
            entry.load()


def check_priority(value: object, operation: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{operation}: expected priority to be an integer, got {value!r}")
    return value


def check_devices(value: object, operation: str) -> frozenset[str] | Callable[[], frozenset[str]]:
    """A device-kind set from a collection of kinds or a single kind; a callable is kept as it is."""
    if callable(value):
        return cast("Callable[[], frozenset[str]]", value)
    kinds = (value,) if isinstance(value, str) else value
    if not isinstance(kinds, Collection) or not all(isinstance(k, str) and k for k in kinds):
        raise ConfigurationError(
            f"{operation}: expected devices to be a device kind ('cuda', 'cpu'), a collection of them or a "
            f"callable returning a frozenset of them, got {value!r}"
        )
    return frozenset(kinds)
