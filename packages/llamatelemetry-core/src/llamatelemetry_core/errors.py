"""The error hierarchy shared by every llamatelemetry component.

Every error the library raises on purpose derives from :class:`LlamaTelemetryError`, so callers can catch the
library's errors without catching unrelated ones. Each subclass also derives from the built-in exception a Python
user would expect for that situation (``ValueError`` for bad configuration, ``RuntimeError`` for hardware that
cannot do the work, ``MemoryError`` for capacity), so existing ``except ValueError`` code keeps working.

Messages follow one rule: say what was expected, what was got, and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailableError",
    "CapabilityError",
    "CapacityError",
    "ConfigurationError",
    "LlamaTelemetryError",
]


class LlamaTelemetryError(Exception):
    """Base class of every error raised on purpose by llamatelemetry."""


class ConfigurationError(LlamaTelemetryError, ValueError):
    """An argument, configuration value or environment variable is invalid.

    Raised before any work starts; the message names the parameter, the accepted values and the value given.
    """


class CapabilityError(LlamaTelemetryError, RuntimeError):
    """The hardware or software present cannot do what was asked.

    For example: a bf16 kernel on a GPU without bf16 support, or a CUDA-only feature on a CPU-only machine.
    """


class BackendUnavailableError(CapabilityError):
    """An implementation of an operation cannot run this call here.

    Raised when an implementation that was requested explicitly (by argument or ``LLAMATELEMETRY_BACKEND``) does
    not support the call, and raised *by* an implementation at run time to ask the dispatcher to fall back to the
    next one when the implementation was chosen automatically.
    """

    def __init__(self, message: str, *, operation: str | None = None, backend: str | None = None) -> None:
        super().__init__(message)
        self.operation = operation
        self.backend = backend


class CapacityError(LlamaTelemetryError, MemoryError):
    """A fixed-size resource is full: a cache, a pool, a batch, device memory.

    The message says how much was available, how much was asked for, and which setting to raise.
    """
