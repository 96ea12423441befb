"""On a CPU, every test runs as the same simulated CPU, whatever the host has.

The launch heuristics read the device's core count (programs per row, splits of a long softmax row): on the
host CPU, which paths the tiny test shapes exercise would depend on the machine. The simulated CPU pins it
(2 cores); on a GPU the tests run on the real device.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from llamatelemetry_core.device import simulate_device


@pytest.fixture(autouse=True)
def _pinned_cpu() -> Iterator[None]:
    if torch.cuda.is_available():
        yield
        return
    with simulate_device("cpu"):
        yield
