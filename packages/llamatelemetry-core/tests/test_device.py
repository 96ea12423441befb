from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llamatelemetry_core.device import (
    CPU_BF16_ENV,
    SIMULATE_ENV,
    SIMULATED_CPUS,
    cpu_device_info,
    get_device_info,
    real_device_info,
    simulate_device,
    simulated_device_key,
)
from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_core.gpu_specs import GPU_SPECS, architecture_name, find_spec, spec_by_key
from llamatelemetry_core.selection import reload_environment


@pytest.mark.parametrize(
    ("device_name", "memory_gib", "key"),
    [
        ("Tesla T4", 15.0, "t4"),
        ("Tesla V100-SXM2-16GB", 16.0, "v100"),
        ("NVIDIA A100-SXM4-40GB", 39.4, "a100"),
        ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80gb"),
        ("NVIDIA A100 80GB PCIe", 79.2, "a100-80gb"),
        ("NVIDIA A10", 22.0, "a10"),
        ("NVIDIA L4", 22.0, "l4"),
        ("NVIDIA L40S", 44.0, "l40s"),
        ("NVIDIA GeForce RTX 2080", 7.8, "rtx2080"),
        ("NVIDIA GeForce RTX 2080 Ti", 10.7, "rtx2080ti"),
        ("NVIDIA GeForce RTX 3090", 23.7, "rtx3090"),
        ("NVIDIA GeForce RTX 3080", 9.8, "rtx3080"),
        ("NVIDIA GeForce RTX 4090", 23.6, "rtx4090"),
        ("NVIDIA GeForce RTX 4080", 15.6, "rtx4080"),
        ("NVIDIA H100 80GB HBM3", 79.1, "h100"),
        ("NVIDIA H100 PCIe", 79.1, "h100-pcie"),
        ("NVIDIA H200", 139.8, "h200"),
        ("NVIDIA B200", 178.0, "b200"),
    ],
)
def test_datasheet_lookup_by_reported_device_name(device_name: str, memory_gib: float, key: str) -> None:
    spec = find_spec(device_name, memory_gib)
    assert spec is not None, f"{device_name} not found"
    assert spec.key == key


def test_unknown_gpu_has_no_datasheet() -> None:
    assert find_spec("NVIDIA A10G", 22.0) is None
    assert find_spec("Some Future GPU", 100.0) is None


@pytest.mark.parametrize(
    ("cc", "name"),
    [
        ((7, 0), "Volta"),
        ((7, 2), "Volta"),
        ((7, 5), "Turing"),
        ((8, 0), "Ampere"),
        ((8, 6), "Ampere"),
        ((8, 7), "Ampere"),
        ((8, 9), "Ada"),
        ((9, 0), "Hopper"),
        ((10, 0), "Blackwell"),
        ((12, 0), "Blackwell"),
        ((6, 1), "Pascal"),
        ((11, 0), "Blackwell"),
        ((13, 0), "unknown (sm_130)"),
    ],
)
def test_architecture_names(cc: tuple[int, int], name: str) -> None:
    assert architecture_name(*cc) == name


def test_datasheet_rows_are_consistent() -> None:
    keys = [s.key for s in GPU_SPECS]
    assert len(keys) == len(set(keys))
    for spec in GPU_SPECS:
        assert spec.sm_count > 0 and spec.memory_bandwidth_gbps > 0 and spec.fp32_tflops > 0
        has_bf16 = spec.compute_capability >= (8, 0)
        assert (spec.bf16_tflops is not None) == has_bf16, spec.key
        assert (spec.tf32_tflops is not None) == has_bf16, spec.key
        if spec.fp16_tflops is not None:
            assert spec.fp16_tflops > spec.fp32_tflops, spec.key  # tensor cores beat the CUDA cores
    # A T4 and an RTX 2080 are both Turing but differ: the table is per model, not per generation.
    t4, rtx = spec_by_key("t4"), spec_by_key("rtx2080")
    assert t4 is not None and rtx is not None
    assert t4.fp16_tflops != rtx.fp16_tflops and t4.compute_capability == rtx.compute_capability


def test_cpu_device_info() -> None:
    info = cpu_device_info()
    assert info.kind == "cpu" and not info.is_cuda
    assert info.compute_capability is None and info.sm is None
    assert info.sm_count >= 1
    assert not info.has_tensor_cores and not info.supports_tf32 and not info.supports_fp8
    assert info.peak is None and not info.simulated
    assert info.to_dict()["compute_capability"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_default_device_is_cpu_without_cuda() -> None:
    assert get_device_info().kind == "cpu"
    with pytest.raises(CapabilityError, match="CUDA is not available"):
        get_device_info("cuda")


def test_simulated_t4_reports_its_datasheet() -> None:
    with simulate_device("t4") as info:
        assert info == get_device_info() == get_device_info("cuda:0")
        assert info.simulated and info.kind == "cuda"
        assert info.compute_capability == (7, 5) and info.sm == 75
        assert info.architecture == "Turing"
        assert info.sm_count == 40
        assert info.shared_memory_per_block_bytes == 64 * 1024
        assert info.has_tensor_cores and not info.supports_bf16 and not info.supports_tf32
        assert info.peak is not None and info.peak.fp16_tflops == 65 and info.peak.memory_bandwidth_gbps == 320
        assert info.capability_at_least(7, 5) and not info.capability_at_least(8, 0)
        # An explicit CPU device stays the CPU while a GPU is simulated.
        assert get_device_info("cpu").kind == "cpu"
        assert get_device_info(torch.device("cpu")).kind == "cpu"
    assert simulated_device_key() is None


@pytest.mark.parametrize(("key", "bf16"), sorted(SIMULATED_CPUS.items()))
def test_a_simulated_cpu_pins_every_fact(key: str, bf16: bool) -> None:
    with simulate_device(key) as info:
        assert info.kind == "cpu" and info.simulated and info.supports_bf16 is bf16
        assert (info.sm_count, info.total_memory_bytes, info.free_memory_bytes) == (2, 8 * 1024**3, 8 * 1024**3)
        assert info.architecture == "x86_64" and info.compute_capability is None and info.peak is None
        assert not (info.has_tensor_cores or info.supports_tf32 or info.supports_fp8)
        # Every way of asking answers with the simulated CPU, an explicit CPU device included.
        for device in (None, "cpu", torch.device("cpu"), "cuda", 0):
            assert get_device_info(device) == info
        assert get_device_info(torch.device("cpu"), refresh_memory=False) == info
    assert get_device_info("cpu").simulated is False


@pytest.mark.parametrize(("value", "expected"), [("0", False), ("1", True), ("off", False), ("yes", True)])
def test_cpu_bf16_detection_can_be_overridden(value: str, expected: bool) -> None:
    # A fresh process: the CPU's static facts are read once per process.
    code = "from llamatelemetry_core.device import cpu_device_info; print(cpu_device_info().supports_bf16)"
    env = {**os.environ, CPU_BF16_ENV: value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)


def test_a_bad_cpu_bf16_override_says_what_to_set() -> None:
    code = "from llamatelemetry_core.device import cpu_device_info; cpu_device_info()"
    env = {**os.environ, CPU_BF16_ENV: "maybe"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert out.returncode != 0 and f"expected {CPU_BF16_ENV} to be 0 or 1, got 'maybe'" in out.stderr


def test_simulation_nests_and_restores() -> None:
    with simulate_device("h100"):
        with simulate_device("T4"):
            assert get_device_info().spec_key == "t4"
        assert get_device_info().spec_key == "h100"
        with simulate_device("cpu"):
            assert get_device_info().kind == "cpu" and not get_device_info().supports_bf16
        with simulate_device("cpu-bf16"):
            assert get_device_info().supports_bf16


def test_simulation_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIMULATE_ENV, "a100")
    reload_environment()  # the variable is read once
    info = get_device_info()
    assert info.simulated and info.spec_key == "a100" and info.supports_bf16 and info.supports_tf32
    assert real_device_info().simulated is False


def test_unknown_simulated_device_lists_known_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match=r"t4.*h100") as exc, simulate_device("t5"):
        pass
    assert "'t5'" in str(exc.value)
    monkeypatch.setenv(SIMULATE_ENV, "k80")
    reload_environment()
    with pytest.raises(ConfigurationError, match=SIMULATE_ENV):
        get_device_info()


def test_invalid_device_type() -> None:
    with pytest.raises(ConfigurationError, match="CUDA or CPU"):
        get_device_info("meta")


@pytest.mark.gpu
def test_real_gpu_facts_match_torch() -> None:
    info = get_device_info()
    props = torch.cuda.get_device_properties(info.index or 0)
    assert info.kind == "cuda" and not info.simulated
    assert info.name == props.name
    assert info.compute_capability == (props.major, props.minor)
    assert info.sm_count == props.multi_processor_count
    assert info.total_memory_bytes == props.total_memory
    assert info.free_memory_bytes is not None and 0 < info.free_memory_bytes <= info.total_memory_bytes
    assert info.shared_memory_per_block_bytes is not None and info.shared_memory_per_block_bytes >= 48 * 1024
    assert info.supports_bf16 == torch.cuda.is_bf16_supported()


def test_static_facts_are_cached_and_free_memory_refreshed() -> None:
    first = get_device_info(refresh_memory=False)
    assert get_device_info(refresh_memory=False) is first  # dispatch pays no device query per call
    fresh = get_device_info()
    assert fresh.name == first.name and fresh.total_memory_bytes == first.total_memory_bytes


def test_simulate_device_refuses_a_key_that_is_not_a_string() -> None:
    with pytest.raises(TypeError, match="expected key to be a device name"), simulate_device(None):  # type: ignore[arg-type]
        pass
