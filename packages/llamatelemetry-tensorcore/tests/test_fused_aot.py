"""The fused path's kernels compiled ahead of time for a T4 (sm_75) and an H100 (sm_90), without a GPU."""

from __future__ import annotations

import pytest

from llamatelemetry_core.device import simulate_device
from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_tensorcore.fused_matmul import kernel_builds

pytest.importorskip("triton")


@pytest.mark.triton_compiler
@pytest.mark.skipif(
    triton_interpreter_enabled(),
    reason="compiling ahead of time needs TRITON_INTERPRET unset (the t4 nox session runs it)",
)
@pytest.mark.parametrize("device", ["t4", "h100"])
def test_builds_compile_within_the_limits_without_spills(device: str) -> None:
    from llamatelemetry_core.aot import compile_build

    with simulate_device(device) as info:
        builds = list(kernel_builds(info))
        reports = [compile_build(build, info) for build in builds]
    assert reports
    for report in reports:
        assert report.ok, (report.build, report.problems)
        assert report.spill_bytes in (0, None), f"{report.build} spills {report.spill_bytes} bytes"
