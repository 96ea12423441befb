"""Reading, setting and restoring PyTorch's process-wide Tensor Core switches.

PyTorch has two APIs for TF32: the boolean ``allow_tf32`` flags (every version) and, from 2.9, the
``fp32_precision`` strings (``"ieee"``, ``"tf32"``, ``"none"`` for "inherit"). Reading a boolean after someone
used the string API can raise ("mix of the legacy and new APIs"), while writing a boolean keeps both views
consistent. So switches are *written* through the booleans, and a snapshot records both views (the strings when
they exist, the booleans when they can be read) so that :func:`restore_flags` puts back exactly what was there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from llamatelemetry_core.environment import tf32_matmul_enabled

__all__ = [
    "BackendFlags",
    "restore_flags",
    "set_flags",
    "snapshot_flags",
    "tf32_disabled",
    "tf32_matmul_enabled",
]

_matmul = torch.backends.cuda.matmul
_cudnn = torch.backends.cudnn
_HAS_PRECISION_API = hasattr(_matmul, "fp32_precision")


@dataclass(frozen=True)
class BackendFlags:
    """The switches llamatelemetry sets, as they were at one moment.

    ``None`` in a boolean field means it could not be read (the string API was used in a way the boolean view
    cannot express); ``precision`` holds the ``fp32_precision`` strings of torch >= 2.9, else ``None``.
    """

    matmul_tf32: bool | None
    cudnn_tf32: bool | None
    cudnn_benchmark: bool
    fp16_reduced_precision_reduction: bool
    bf16_reduced_precision_reduction: bool
    precision: tuple[tuple[str, str], ...] | None = None


def _read_bool(getter: type[object] | object, name: str) -> bool | None:
    try:
        return bool(getattr(getter, name))
    except RuntimeError:  # torch >= 2.9 after a mix of the two TF32 APIs
        return None


def _precision_targets() -> dict[str, Any]:
    targets: dict[str, Any] = {"matmul": _matmul}
    cudnn_conv = getattr(_cudnn, "conv", None)
    cudnn_rnn = getattr(_cudnn, "rnn", None)
    if cudnn_conv is not None:
        targets["cudnn.conv"] = cudnn_conv
    if cudnn_rnn is not None:
        targets["cudnn.rnn"] = cudnn_rnn
    targets["cudnn"] = _cudnn
    return targets


def _reduced_precision(name: str) -> bool:
    value = getattr(_matmul, name)
    # Some versions report a tuple (allow_reduced_precision, allow_splitk); the first item is the switch we set.
    if isinstance(value, tuple):
        return bool(value[0])
    return bool(value)


def snapshot_flags() -> BackendFlags:
    """The current state of every switch :func:`set_flags` may change."""
    precision: tuple[tuple[str, str], ...] | None = None
    if _HAS_PRECISION_API:
        precision = tuple((name, str(target.fp32_precision)) for name, target in _precision_targets().items())
    return BackendFlags(
        matmul_tf32=_read_bool(_matmul, "allow_tf32"),
        cudnn_tf32=_read_bool(_cudnn, "allow_tf32"),
        cudnn_benchmark=bool(_cudnn.benchmark),
        fp16_reduced_precision_reduction=_reduced_precision("allow_fp16_reduced_precision_reduction"),
        bf16_reduced_precision_reduction=_reduced_precision("allow_bf16_reduced_precision_reduction"),
        precision=precision,
    )


def set_flags(
    *,
    tf32: bool | None = None,
    cudnn_benchmark: bool | None = None,
    fp16_reduced_precision_reduction: bool | None = None,
    bf16_reduced_precision_reduction: bool | None = None,
) -> None:
    """Set the given switches; ``None`` leaves one as it is. ``tf32`` covers cuBLAS matmuls and cuDNN."""
    if tf32 is not None:
        _matmul.allow_tf32 = tf32
        _cudnn.allow_tf32 = tf32
    if cudnn_benchmark is not None:
        _cudnn.benchmark = cudnn_benchmark
    if fp16_reduced_precision_reduction is not None:
        _matmul.allow_fp16_reduced_precision_reduction = fp16_reduced_precision_reduction
    if bf16_reduced_precision_reduction is not None:
        _matmul.allow_bf16_reduced_precision_reduction = bf16_reduced_precision_reduction


def restore_flags(flags: BackendFlags) -> None:
    """Put every switch back as ``flags`` recorded it."""
    if flags.matmul_tf32 is not None:
        _matmul.allow_tf32 = flags.matmul_tf32
    if flags.cudnn_tf32 is not None:
        _cudnn.allow_tf32 = flags.cudnn_tf32
    if flags.precision is not None:
        targets = _precision_targets()
        # Parents before children: setting a parent string may reset the children that inherit from it.
        for name, value in sorted(flags.precision, key=lambda item: item[0].count(".")):
            targets[name].fp32_precision = value
    _cudnn.benchmark = flags.cudnn_benchmark
    _matmul.allow_fp16_reduced_precision_reduction = flags.fp16_reduced_precision_reduction
    _matmul.allow_bf16_reduced_precision_reduction = flags.bf16_reduced_precision_reduction


@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """Within the block fp32 matmuls and convolutions run in full fp32 (no TF32); restored afterwards."""
    before = snapshot_flags()
    set_flags(tf32=False)
    try:
        yield
    finally:
        restore_flags(before)
