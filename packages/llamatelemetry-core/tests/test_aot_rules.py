"""Rules of ahead-of-time compilation that need no compiler."""

from __future__ import annotations

import pytest

from llamatelemetry_core.aot import KernelBuild, compile_build
from llamatelemetry_core.device import simulate_device
from llamatelemetry_core.environment import TRITON_INTERPRET_ENV
from llamatelemetry_core.errors import CapabilityError


def test_compiling_under_the_interpreter_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRITON_INTERPRET_ENV, "1")
    build = KernelBuild("probe", object(), {"n": "i32"})
    with simulate_device("t4") as t4, pytest.raises(CapabilityError, match=rf"{TRITON_INTERPRET_ENV}=0"):
        compile_build(build, t4)
