"""Shared fixtures of the llamatelemetry-kvcache tests."""

from __future__ import annotations

import secrets

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed() -> int:
    """A fresh global seed per test; printed, so a failing test shows it (``torch.manual_seed(<seed>)`` replays)."""
    seed = secrets.randbits(31)
    print(f"torch seed: {seed}")
    torch.manual_seed(seed)
    return seed
