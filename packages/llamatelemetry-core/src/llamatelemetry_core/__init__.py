"""llamatelemetry-core: what every llamatelemetry component shares.

* :mod:`~llamatelemetry_core.device`: device facts (real or simulated) and datasheet peaks;
* :mod:`~llamatelemetry_core.selection`: choosing an implementation of an operation;
* :mod:`~llamatelemetry_core.errors`: the error hierarchy; :mod:`~llamatelemetry_core.validation`: its messages;
* :mod:`~llamatelemetry_core.environment`: Triton, flash-attn and SDPA availability;
* :mod:`~llamatelemetry_core.aot`: compiling Triton kernels for GPUs that are not present;
* :mod:`~llamatelemetry_core.testing`: tolerances, ``assert_close`` and the pytest plugin.
"""

from llamatelemetry_core.__about__ import __version__
from llamatelemetry_core.device import DeviceInfo, PeakThroughput, get_device_info, simulate_device
from llamatelemetry_core.errors import (
    BackendUnavailableError,
    CapabilityError,
    CapacityError,
    ConfigurationError,
    LlamaTelemetryError,
)
from llamatelemetry_core.selection import CallSpec, Operation, last_selection, record_selections

__all__ = [
    "BackendUnavailableError",
    "CallSpec",
    "CapabilityError",
    "CapacityError",
    "ConfigurationError",
    "DeviceInfo",
    "LlamaTelemetryError",
    "Operation",
    "PeakThroughput",
    "__version__",
    "get_device_info",
    "last_selection",
    "record_selections",
    "simulate_device",
]
