"""Walking the tensors of nested outputs and arguments: tuples (named too), lists and dicts; the rest are leaves.

A small private helper instead of ``torch.utils._pytree``, which is private to PyTorch and changes between
releases.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch

__all__ = ["as_tensor_tuple", "clone_outputs", "map_tensors", "replace_tensors", "signature", "tensor_leaves"]


def _is_namedtuple(value: object) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def tensor_leaves(value: object) -> list[torch.Tensor]:
    """Every tensor in ``value``, depth first, in iteration order (dict insertion order)."""
    found: list[torch.Tensor] = []

    def walk(node: object) -> None:
        if isinstance(node, torch.Tensor):
            found.append(node)
        elif isinstance(node, tuple | list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for item in node.values():
                walk(item)

    walk(value)
    return found


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with every tensor ``t`` replaced by ``fn(t)``; containers are rebuilt, other leaves kept."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if _is_namedtuple(value):
        return type(value)._make(map_tensors(fn, item) for item in value)
    if isinstance(value, tuple):
        items = tuple(map_tensors(fn, item) for item in value)
        return items if type(value) is tuple else type(value)(items)
    if isinstance(value, list | dict):
        # A shallow copy keeps the container's own type and attributes (OrderedDict, model-output dicts).
        rebuilt = copy.copy(value)
        keys = range(len(value)) if isinstance(value, list) else list(value.keys())
        for key in keys:
            rebuilt[key] = map_tensors(fn, value[key])
        return rebuilt
    return value


def replace_tensors(value: Any, replacements: Iterator[torch.Tensor]) -> Any:
    """``value`` with its tensors replaced, in :func:`tensor_leaves` order, by the items of ``replacements``."""
    return map_tensors(lambda _t: next(replacements), value)


def clone_outputs(value: Any) -> Any:
    """A copy of ``value`` whose tensors are fresh clones, safe to keep across replays.

    Replays write their outputs into the same static tensors every time; clone what you need to keep. Works on
    a tensor or any nesting of tuples, lists and dicts; other values are returned as they are.
    """
    return map_tensors(lambda t: t.clone(), value)


def signature(value: object) -> Hashable | None:
    """A hashable key of ``value``'s structure: tensors by (shape, dtype, device), other leaves by value.

    ``None`` when a non-tensor leaf is unhashable, so no key can stand for it.
    """
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, tuple | list):
        items = [signature(item) for item in value]
        if any(item is None for item in items):
            return None
        return (type(value), tuple(items))
    if isinstance(value, dict):
        keys = tuple(value.keys())
        items = [signature(value[k]) for k in keys]
        if any(item is None for item in items):
            return None
        try:
            hash(keys)
        except TypeError:
            return None
        return (type(value), keys, tuple(items))
    try:
        hash(value)
    except TypeError:
        return None
    return ("value", type(value), value)


def as_tensor_tuple(value: object, name: str) -> tuple[torch.Tensor, ...]:
    """``value`` as a tuple of tensors; ``TypeError`` naming ``name`` and the culprit otherwise."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or isinstance(value, str):
        got = "a single tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"expected {name} to be a tuple or list of tensors, got {got}; write {name}=(x,) for one")
    items = tuple(value)
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"expected {name}[{i}] to be a torch.Tensor, got {type(item).__name__}")
    return items
