from __future__ import annotations

import sys
from typing import Any

import pytest
import torch

from llamatelemetry_core.device import get_device_info, simulate_device
from llamatelemetry_core.environment import (
    PDL_ENV,
    SDPA_NOT_PROBED,
    TRITON_INTERPRET_ENV,
    distribution_version,
    flash_attn_status,
    pdl_capable,
    programmatic_launch,
    reload_launch_env,
    sdpa_backend_status,
    triton_devices,
    triton_interpreter_enabled,
    triton_status,
)
from llamatelemetry_core.toolchain import TESTED_RANGES


def test_interpreter_flag_controls_triton_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRITON_INTERPRET_ENV, "1")
    assert triton_interpreter_enabled() and triton_devices() == {"cuda", "cpu"}
    monkeypatch.setenv(TRITON_INTERPRET_ENV, "0")
    assert not triton_interpreter_enabled() and triton_devices() == {"cuda"}


def test_programmatic_launch_only_for_hopper_gpus_and_never_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PDL_ENV, raising=False)
    reload_launch_env()
    assert not programmatic_launch(torch.ones(2))  # a CPU tensor: no grid dependency control to use
    for key, capable in (("t4", False), ("a100", False), ("h100", True)):
        with simulate_device(key) as info:
            assert pdl_capable(info) is capable, key  # what the ahead-of-time builds compile
    if torch.cuda.is_available():
        t = torch.ones(2, device="cuda")
        monkeypatch.delenv(TRITON_INTERPRET_ENV, raising=False)
        reload_launch_env()
        assert programmatic_launch(t) == (torch.cuda.get_device_capability() >= (9, 0))
        monkeypatch.setenv(TRITON_INTERPRET_ENV, "1")
        reload_launch_env()
        assert not programmatic_launch(t)
        monkeypatch.delenv(TRITON_INTERPRET_ENV)
        for off in ("0", "false", "OFF", "no"):
            monkeypatch.setenv(PDL_ENV, off)
            reload_launch_env()
            assert not programmatic_launch(t), off
    reload_launch_env()  # the variables as they were once monkeypatch restores them


def test_the_launch_variables_are_read_once_until_reloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Read at the first launch that asks and remembered (a launch pays no environment lookup), read again after
    # reload_launch_env, which reset_selection_cache (reload_environment) calls. A stand-in for a CUDA tensor on
    # a Hopper GPU, so that this runs on any machine.
    import llamatelemetry_core.environment as environment
    from llamatelemetry_core.selection import reset_selection_cache

    monkeypatch.setattr(environment, "_pdl_capable_index", lambda index: True)
    monkeypatch.delenv(TRITON_INTERPRET_ENV, raising=False)  # the interpreter never launches with PDL
    hopper_tensor: Any = _CudaLike()
    monkeypatch.setenv(PDL_ENV, "0")
    reload_launch_env()
    assert not programmatic_launch(hopper_tensor)
    monkeypatch.setenv(PDL_ENV, "1")
    assert not programmatic_launch(hopper_tensor)  # the value read first, until reloaded
    reset_selection_cache()
    assert programmatic_launch(hopper_tensor)
    monkeypatch.setenv(PDL_ENV, "off")
    assert programmatic_launch(hopper_tensor)
    reload_launch_env()
    assert not programmatic_launch(hopper_tensor)
    monkeypatch.undo()
    reload_launch_env()


class _CudaLike:
    """What programmatic_launch reads of a tensor: that it is on a CUDA device, and which."""

    is_cuda = True

    def get_device(self) -> int:
        return 0


@pytest.mark.no_triton
def test_triton_missing_says_how_to_install_where_it_would_run() -> None:
    with simulate_device("t4"):
        status = triton_status()
    assert not status.installed and not status.usable
    # A Triton within the tested range: an unbounded one may be a release that does not compile the kernels.
    assert status.reason == f'install it with: pip install "triton{TESTED_RANGES["triton"]}"'
    with simulate_device("cpu"):
        status = triton_status()
    assert status.reason is not None and "not needed on a CPU" in status.reason and "pip" not in status.reason


@pytest.mark.triton
def test_triton_probe_runs_where_triton_can() -> None:
    status = triton_status()
    assert status.installed and status.version
    assert status.usable, status.reason


@pytest.mark.triton_compiler
def test_triton_on_cpu_without_interpreter_is_not_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRITON_INTERPRET_ENV, raising=False)
    with simulate_device("cpu"):
        status = triton_status()
    assert status.installed and not status.usable
    assert status.reason is not None and TRITON_INTERPRET_ENV in status.reason


def test_flash_attn_never_usable_on_t4_or_cpu_and_never_advised_there() -> None:
    with simulate_device("t4"):
        t4 = flash_attn_status()
    assert not t4.usable
    assert t4.reason is not None and "compute capability >= 8.0" in t4.reason and "pip" not in t4.reason
    with simulate_device("cpu"):
        cpu = flash_attn_status()
    assert not cpu.usable and cpu.reason is not None and "CUDA GPUs only" in cpu.reason and "pip" not in cpu.reason


def test_flash_attn_is_advised_only_where_it_would_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # as if it were not installed
    with simulate_device("a100"):
        status = flash_attn_status()
    assert not status.installed and not status.usable
    assert status.reason == "install it with: pip install flash-attn --no-build-isolation"


def test_sdpa_backends_probe_really_runs() -> None:
    status = sdpa_backend_status()
    assert status["math"] is None  # the math backend runs everywhere
    if get_device_info().is_cuda:
        assert status["efficient"] is None
    with simulate_device("t4"):
        assert all(v == SDPA_NOT_PROBED == "not probed (simulated)" for v in sdpa_backend_status().values())


def test_distribution_version() -> None:
    assert distribution_version("torch") == torch.__version__.split("+")[0] or distribution_version("torch")
    assert distribution_version("no-such-distribution-xyz") is None
