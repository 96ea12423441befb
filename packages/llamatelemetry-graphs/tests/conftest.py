"""Shared fixtures for the llamatelemetry-graphs tests."""

from __future__ import annotations

import secrets

import pytest
import torch


@pytest.fixture
def rng() -> torch.Generator:
    """A generator with a fresh seed per test; the seed is printed, so a failing test shows it."""
    seed = secrets.randbits(31)
    print(f"rng seed: {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def eager_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the package as on a machine without CUDA (its eager emulation), whatever this machine has."""
    from llamatelemetry_graphs import _runtime

    monkeypatch.setattr(_runtime, "cuda_available", lambda: False)
