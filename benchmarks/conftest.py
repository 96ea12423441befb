"""pytest-benchmark settings shared by every benchmark: results are stored per GPU model.

pytest-benchmark's default storage (``./.benchmarks``) is keyed by the machine's CPU, not its GPU, so a
comparison could put an H100 run beside a T4 baseline. Here the default storage becomes
``benchmarks/results/<gpu-slug>/pytest-benchmark`` and the GPU's name is added to the machine info.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llamatelemetry_core.device import real_device_info
from llamatelemetry_core.testing.bench import device_slug

RESULTS = Path(__file__).parent / "results"
_DEFAULT_STORAGE = "file://./.benchmarks"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "benchmark_storage", None) == _DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{RESULTS / device_slug() / 'pytest-benchmark'}"


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    device = real_device_info()
    machine_info["gpu"] = device.name if device.is_cuda else None
    machine_info["compute_capability"] = None if device.sm is None else str(device.sm)
