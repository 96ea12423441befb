"""Shared fixtures and helpers of the llamatelemetry-flashattn tests."""

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
