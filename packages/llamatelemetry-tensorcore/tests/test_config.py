from __future__ import annotations

import logging

import pytest
import torch

from llamatelemetry_core import get_device_info, simulate_device
from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_tensorcore import TensorCoreWarning, enable_tensor_cores, plan_tensor_cores
from llamatelemetry_tensorcore._flags import snapshot_flags, tf32_disabled, tf32_matmul_enabled

TF32_GPUS = ["a100", "l4", "h100", "b200"]
PRE_AMPERE = ["v100", "t4", "rtx2080"]


@pytest.mark.parametrize("key", TF32_GPUS)
@pytest.mark.parametrize("allow_tf32", [True, False])
def test_plan_sets_tf32_from_ampere_on(key: str, allow_tf32: bool) -> None:
    with simulate_device(key) as info:
        plan = plan_tensor_cores(info, torch.float16, allow_tf32)
    assert plan.tensor_cores and plan.tf32_applies and plan.tf32 is allow_tf32
    assert plan.switches() == {"tf32": allow_tf32, "cudnn_benchmark": True, "fp16_reduced_precision_reduction": True}


@pytest.mark.parametrize("key", PRE_AMPERE)
def test_plan_says_tf32_does_not_apply_before_ampere(key: str) -> None:
    with simulate_device(key) as info:
        plan = plan_tensor_cores(info, torch.float16, allow_tf32=True)
    assert plan.tensor_cores and not plan.tf32_applies and plan.tf32 is None
    assert "tf32" not in plan.switches()
    assert any("TF32 does not apply" in note for note in plan.notes)


def test_plan_sets_the_reduction_switch_of_the_compute_dtype() -> None:
    with simulate_device("a100") as info:
        bf16 = plan_tensor_cores(info, torch.bfloat16, reduced_precision_reduction=False, cudnn_benchmark=False)
        fp32 = plan_tensor_cores(info, torch.float32, allow_tf32=False)
    assert bf16.switches() == {"tf32": True, "cudnn_benchmark": False, "bf16_reduced_precision_reduction": False}
    assert fp32.switches() == {"tf32": False, "cudnn_benchmark": True}
    assert any("will not use Tensor Cores" in note for note in fp32.notes)


def test_bf16_on_a_t4_warns_and_plans_fp16_or_raises_when_strict() -> None:
    with simulate_device("t4") as info:
        with pytest.warns(TensorCoreWarning, match=r"bfloat16 Tensor Cores need compute capability >= 8\.0"):
            plan = plan_tensor_cores(info, torch.bfloat16)
        with pytest.raises(CapabilityError, match=r"pass dtype=torch\.float16"):
            plan_tensor_cores(info, torch.bfloat16, strict=True)
    assert plan.requested_dtype == torch.bfloat16 and plan.compute_dtype == torch.float16
    assert plan.switches()["fp16_reduced_precision_reduction"] is True


def test_plan_on_cpu_sets_nothing() -> None:
    with simulate_device("cpu") as info:
        plan = plan_tensor_cores(info, torch.bfloat16)
    assert not plan.tensor_cores and plan.switches() == {} and plan.compute_dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.float8_e4m3fn])
def test_plan_rejects_other_dtypes(dtype: torch.dtype) -> None:
    with pytest.raises(ConfigurationError, match=r"expected dtype to be one of torch\.float16, torch\.bfloat16"):
        plan_tensor_cores(get_device_info("cpu"), dtype)


def test_enable_sets_and_the_context_manager_restores() -> None:
    before = snapshot_flags()
    with simulate_device("a100"), enable_tensor_cores(dtype=torch.float16, allow_tf32=True) as config:
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
        assert tf32_matmul_enabled()
        assert config.tf32_enabled is True and config.cudnn_benchmark is True and config.tensor_cores
        assert config.applied["fp16_reduced_precision_reduction"] is True
        assert config.previous == before
    assert snapshot_flags() == before


def test_nested_enables_restore_in_order() -> None:
    before = snapshot_flags()
    with simulate_device("h100"), enable_tensor_cores(allow_tf32=True):
        middle = snapshot_flags()
        with enable_tensor_cores(allow_tf32=False, cudnn_benchmark=False) as inner:
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.benchmark
            assert inner.tf32_enabled is False
        assert snapshot_flags() == middle
    assert snapshot_flags() == before


def test_plain_call_persists_until_restore() -> None:
    before = snapshot_flags()
    with simulate_device("l4"):
        config = enable_tensor_cores(allow_tf32=True)
    assert torch.backends.cuda.matmul.allow_tf32
    config.restore()
    config.restore()  # idempotent
    assert snapshot_flags() == before


def test_t4_config_records_that_tf32_was_not_touched() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    with simulate_device("t4"), enable_tensor_cores(allow_tf32=True) as config:
        assert config.tf32_applies is False and config.tf32_enabled is None
        assert "tf32" not in config.applied and torch.backends.cuda.matmul.allow_tf32 is False
        assert config.cudnn_benchmark is True


def test_bf16_on_t4_enables_fp16() -> None:
    with simulate_device("t4"):
        with pytest.warns(TensorCoreWarning):
            config = enable_tensor_cores(torch.bfloat16)
        with config:
            assert config.dtype == torch.float16
        with pytest.raises(CapabilityError):
            enable_tensor_cores(torch.bfloat16, strict=True)


def test_enable_without_a_gpu_changes_nothing_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    before = snapshot_flags()
    with simulate_device("cpu"), caplog.at_level(logging.WARNING, logger="llamatelemetry_tensorcore"):
        config = enable_tensor_cores()
    assert config.applied == {} and not config.tensor_cores and config.tf32_enabled is None
    assert snapshot_flags() == before
    assert any("nothing is changed" in r.getMessage() for r in caplog.records)


def test_restore_after_the_string_tf32_api_was_used() -> None:
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision strings")
    matmul.fp32_precision = "ieee"
    before = snapshot_flags()
    with simulate_device("a100"), enable_tensor_cores(allow_tf32=True):
        assert tf32_matmul_enabled()
    assert snapshot_flags().precision == before.precision
    assert not tf32_matmul_enabled()


def test_tf32_disabled_block() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    with tf32_disabled():
        assert not torch.backends.cuda.matmul.allow_tf32 and not tf32_matmul_enabled()
    assert torch.backends.cuda.matmul.allow_tf32
