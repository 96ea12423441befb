"""The conformance suite catches what it promises to catch."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from llamatelemetry_core.selection import Operation
from llamatelemetry_core.testing.conformance import Conformance
from llamatelemetry_core.traced import dispatch

_counter = itertools.count()


def _suite(fast: Any) -> Conformance:
    op = Operation(f"conformance.double_{next(_counter)}", lambda x: x * 2)
    op.register("fast", fast, priority=10, devices={"cpu"})

    def call(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        result: torch.Tensor = dispatch(op, (x,), x, backend=backend)
        return result

    return Conformance(op, call, lambda gen, dtype, device: (torch.randn(5, 3, generator=gen).to(dtype),))


def test_a_conforming_operation_passes_every_check() -> None:
    suite = _suite(lambda x: x + x)
    assert suite.check_implementations(torch.float32) == ["fast", "reference"]
    suite.check_fullgraph(torch.float32)
    suite.check_fallback(torch.float32)


def test_a_wrong_implementation_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"\[fast\]"):
        _suite(lambda x: x * 2.001).check_implementations(torch.float32)
