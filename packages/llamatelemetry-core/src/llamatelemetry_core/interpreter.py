"""Serialising Triton launches that run in the interpreter (``TRITON_INTERPRET=1``).

Triton's interpreter runs a kernel's programs in Python with process-wide state (the patched ``tl`` builtins,
the grid being executed); two threads launching at once corrupt each other and fail with ``InterpreterError``
or wrong values. Every launch of a Triton kernel on a CPU tensor goes through :func:`triton_launch_guard`,
which holds one process-wide lock under the interpreter. Compiled launches on a GPU are thread-safe and take
no lock.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from llamatelemetry_core.environment import triton_interpreter_enabled

__all__ = ["INTERPRETER_LOCK", "triton_launch_guard"]

INTERPRETER_LOCK = threading.RLock()
"""Held while a kernel runs in the Triton interpreter (re-entrant: a launcher may launch several kernels)."""

_NO_LOCK = contextlib.nullcontext()


def triton_launch_guard(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """The interpreter lock for a launch on a CPU ``device`` under ``TRITON_INTERPRET=1``; a no-op otherwise."""
    if device.type == "cpu" and triton_interpreter_enabled():
        return INTERPRETER_LOCK
    return _NO_LOCK
