"""Errors of the engine, each also a core error (and so a ``ValueError``/``RuntimeError``/``MemoryError``)."""

from __future__ import annotations

from llamatelemetry_core.errors import CapabilityError, CapacityError, ConfigurationError

__all__ = ["ModelLoadError", "PromptTooLongError", "RequestTooLargeError", "StepGraphCaptureError"]


class ModelLoadError(ConfigurationError):
    """Weights or a configuration could not be read: missing, corrupt, or of an unsupported architecture."""


class PromptTooLongError(ConfigurationError):
    """A prompt (plus the tokens asked for) is longer than the model's context."""


class RequestTooLargeError(CapacityError):
    """A request needs more KV blocks than the whole cache has, so it could never run."""


class StepGraphCaptureError(CapabilityError):
    """Capturing the step graphs failed; the runner then runs steps that carry prompt tokens eagerly."""
