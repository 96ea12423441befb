from __future__ import annotations

import logging

import pytest
import torch

from llamatelemetry_core import simulate_device
from llamatelemetry_core.errors import CapabilityError
from llamatelemetry_core.gpu_specs import spec_by_key
from llamatelemetry_tensorcore import (
    check_tensor_core_support,
    estimated_speedup,
    get_tensor_core_info,
    measure_matmul_speedup,
    tensor_core_dtypes,
)

# key: (architecture, compute capability, Tensor Core dtypes)
EXPECTED = {
    "v100": ("Volta", "7.0", ["float16"]),
    "t4": ("Turing", "7.5", ["float16", "int8"]),
    "rtx2080": ("Turing", "7.5", ["float16", "int8"]),
    "a100": ("Ampere", "8.0", ["float16", "bfloat16", "tfloat32", "int8"]),
    "l4": ("Ada", "8.9", ["float16", "bfloat16", "tfloat32", "int8", "float8_e4m3fn", "float8_e5m2"]),
    "h100": ("Hopper", "9.0", ["float16", "bfloat16", "tfloat32", "int8", "float8_e4m3fn", "float8_e5m2"]),
    "b200": ("Blackwell", "10.0", ["float16", "bfloat16", "tfloat32", "int8", "float8_e4m3fn", "float8_e5m2"]),
}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_info_of_simulated_gpus_uses_that_models_datasheet(key: str) -> None:
    architecture, cc, dtypes = EXPECTED[key]
    spec = spec_by_key(key)
    assert spec is not None
    with simulate_device(key):
        assert check_tensor_core_support()
        info = get_tensor_core_info()
    assert info["supported"] is True and "reason" not in info
    assert info["architecture"] == architecture and info["compute_capability"] == cc
    assert info["simulated"] is True and spec.name in info["device"]
    assert info["fp16_tflops"] == spec.fp16_tflops and info["bf16_tflops"] == spec.bf16_tflops
    assert info["tf32_tflops"] == spec.tf32_tflops and info["int8_tops"] == spec.int8_tops
    assert info["fp8_tflops"] == spec.fp8_tflops
    assert info["memory_bandwidth_gbps"] == spec.memory_bandwidth_gbps
    assert info["supported_dtypes"] == dtypes
    assert spec.fp16_tflops is not None
    assert info["estimated_speedup"] == pytest.approx(spec.fp16_tflops / spec.fp32_tflops, abs=0.01)


def test_same_generation_models_report_their_own_figures() -> None:
    with simulate_device("t4"):
        t4 = get_tensor_core_info()
    with simulate_device("rtx2080"):
        rtx = get_tensor_core_info()
    assert t4["architecture"] == rtx["architecture"] == "Turing"
    assert (t4["fp16_tflops"], t4["memory_bandwidth_gbps"]) == (65, 320)
    assert (rtx["fp16_tflops"], rtx["memory_bandwidth_gbps"]) == (40.3, 448)
    assert t4["estimated_speedup"] != rtx["estimated_speedup"]


def test_t4_has_no_bf16_or_tf32_figures() -> None:
    with simulate_device("t4"):
        info = get_tensor_core_info()
    assert info["bf16_tflops"] is None and info["tf32_tflops"] is None and info["fp8_tflops"] is None
    assert info["estimated_speedup"] == pytest.approx(65 / 8.1, abs=0.01)


def test_cpu_is_unsupported_with_a_reason_and_still_numeric(caplog: pytest.LogCaptureFixture) -> None:
    with simulate_device("cpu"), caplog.at_level(logging.DEBUG, logger="llamatelemetry_tensorcore"):
        assert check_tensor_core_support() is False
        info = get_tensor_core_info()
    assert info["supported"] is False and "no CUDA device" in info["reason"]
    assert info["estimated_speedup"] == 1.0 and info["supported_dtypes"] == []
    assert info["compute_capability"] is None and info["fp16_tflops"] is None
    assert any("no Tensor Cores" in r.getMessage() for r in caplog.records)


def test_check_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    check_tensor_core_support()
    get_tensor_core_info()
    assert capsys.readouterr() == ("", "")


def test_explicit_cpu_device_answers_for_the_cpu() -> None:
    with simulate_device("h100"):
        assert check_tensor_core_support("cpu") is False
        assert get_tensor_core_info(torch.device("cpu"))["kind"] == "cpu"


def test_pre_volta_and_unknown_models(monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    with simulate_device("t4") as t4:
        pascal = dataclasses.replace(
            t4, compute_capability=(6, 1), architecture="Pascal", has_tensor_cores=False, name="GTX 1080"
        )
        unknown = dataclasses.replace(t4, peak=None, name="Some future GPU")
    assert tensor_core_dtypes(pascal) == [] and estimated_speedup(pascal) == 1.0
    assert estimated_speedup(unknown) is None
    monkeypatch.setattr("llamatelemetry_tensorcore.info.get_device_info", lambda device=None: pascal)
    info = get_tensor_core_info()
    assert info["supported"] is False and "6.1 (Pascal)" in info["reason"] and "7.0" in info["reason"]
    monkeypatch.setattr("llamatelemetry_tensorcore.info.get_device_info", lambda device=None: unknown)
    info = get_tensor_core_info()
    assert info["supported"] is True and info["estimated_speedup"] is None and "measure=True" in info["note"]


def test_measuring_needs_a_real_gpu() -> None:
    with simulate_device("h100"), pytest.raises(CapabilityError, match="simulated device"):
        get_tensor_core_info(measure=True)
    with simulate_device("cpu"), pytest.raises(CapabilityError, match="real CUDA device, got a CPU"):
        measure_matmul_speedup()


@pytest.mark.gpu
def test_measured_speedup_on_this_gpu() -> None:
    info = get_tensor_core_info(measure=True)
    assert info["measured_speedup"] > 0 and info["measured_fp16_tflops"] > 0 and info["measured_fp32_tflops"] > 0
    if info["supported"]:
        assert info["measured_speedup"] > 1.5, info
