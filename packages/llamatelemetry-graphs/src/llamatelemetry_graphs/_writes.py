"""Finding what a module call writes in place: its inputs, its parameters and buffers.

A graph replays on static copies of the inputs, and warm-up and capture run the module several times; a module
that updates an input in place (a KV cache: ``cache.index_copy_(...)``) or its own state (BatchNorm's running
statistics in training mode) would lose the input's update and repeat the state's. :func:`record_writes` runs
one eager call and reports which tensors it wrote, by three independent signals, so that one missing never
hides a write:

* every operator that reaches PyTorch's dispatcher declares the arguments it writes (``Tensor(a!)`` in its
  schema); a :class:`~torch.utils._python_dispatch.TorchDispatchMode` collects their storages;
* version counters, bumped by every in-place operation on a tensor that has one (not inference tensors);
* values, compared with copies taken before the call, for the inputs (a copy the graph needs anyway) and for
  the buffers of submodules in training mode (normalisation statistics, small): operators whose schema does
  not declare a write (``aten::batch_norm`` under inference mode) are caught there.

A write that bypasses PyTorch entirely (a raw kernel launch on a buffer of an eval-mode module) is not seen;
the Triton operations of llamatelemetry dispatch through their custom operators while a mode is active, so
theirs are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Writes", "record_writes", "same_values"]


def _storage(t: torch.Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


class _WriteRecorder(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Collects the storages of every argument an operator declares it writes."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.storages: set[int] = set()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            alias = arg.alias_info
            if alias is None or not alias.is_write:
                continue
            value = kwargs.get(arg.name) if arg.kwarg_only or i >= len(args) else args[i]
            for t in value if isinstance(value, list | tuple) else (value,):
                if isinstance(t, torch.Tensor) and t.numel():
                    self.storages.add(_storage(t))
        return func(*args, **kwargs)


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape hold the same values (NaN equal to NaN)."""
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return torch.equal(a, b)


def _version(t: torch.Tensor) -> int | None:
    if t.is_inference():
        return None  # inference tensors keep no version counter
    return int(t._version)


@dataclass
class Writes:
    """What one call wrote: positions of written inputs, names of written parameters and buffers."""

    inputs: tuple[int, ...] = ()
    state: tuple[str, ...] = ()
    state_tensors: list[torch.Tensor] = field(default_factory=list)


@contextlib.contextmanager
def record_writes(
    module: torch.nn.Module, inputs: Sequence[torch.Tensor], before: Sequence[torch.Tensor]
) -> Iterator[Writes]:
    """Record what the block (one call of ``module`` on ``inputs``) writes; filled in when the block ends.

    ``before`` holds copies of ``inputs`` taken before the block, in the same order.
    """
    state: dict[str, torch.Tensor] = dict(module.named_parameters())
    state.update(module.named_buffers())
    training_buffers = {
        f"{prefix}.{name}" if prefix else name: buffer
        for prefix, sub in module.named_modules()
        if sub.training
        for name, buffer in sub.named_buffers(recurse=False)
    }
    with torch.no_grad():
        state_before = {name: t.clone() for name, t in training_buffers.items()}
    versions = {name: _version(t) for name, t in state.items()}
    input_versions = [_version(t) for t in inputs]
    writes = Writes()
    recorder = _WriteRecorder()
    with recorder:
        yield writes
    written = recorder.storages
    writes.inputs = tuple(
        i
        for i, (t, old, version) in enumerate(zip(inputs, before, input_versions, strict=True))
        if (t.numel() and _storage(t) in written)
        or (version is not None and _version(t) != version)
        or not same_values(t, old)
    )
    names = [
        name
        for name, t in state.items()
        if (t.numel() and _storage(t) in written)
        or (versions[name] is not None and _version(t) != versions[name])
        or (name in state_before and not same_values(t, state_before[name]))
    ]
    writes.state = tuple(names)
    writes.state_tensors = [state[name] for name in names]
