"""``llamatelemetry.cuda.tensor_core`` re-exports ``llamatelemetry_tensorcore`` and runs the guide's calls."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
import torch

from llamatelemetry._components import COMPONENTS
from llamatelemetry_core import simulate_device
from llamatelemetry_tensorcore._flags import restore_flags, snapshot_flags

DOCUMENTED = {
    "check_tensor_core_support",
    "enable_amp",
    "enable_tensor_cores",
    "get_tensor_core_info",
    "matmul_tensor_core",
    "optimize_for_tensor_cores",
}


@pytest.fixture(autouse=True)
def _restore_backend_flags() -> Iterator[None]:
    before = snapshot_flags()  # optimize_for_tensor_cores turns cuDNN benchmark on for good on a GPU
    yield
    restore_flags(before)


def test_documented_names_are_the_components_own() -> None:
    module = importlib.import_module("llamatelemetry.cuda.tensor_core")
    backing = importlib.import_module("llamatelemetry_tensorcore")
    assert set(COMPONENTS["tensorcore"].documented_names) <= set(module.__all__)
    assert DOCUMENTED | {"TensorCoreConfig"} <= set(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is getattr(backing, name)


@pytest.mark.filterwarnings("ignore::llamatelemetry_tensorcore.TensorCoreWarning")
def test_the_guide_calls_work_on_any_machine() -> None:
    from llamatelemetry.cuda.tensor_core import (
        check_tensor_core_support,
        enable_amp,
        enable_tensor_cores,
        get_tensor_core_info,
        matmul_tensor_core,
        optimize_for_tensor_cores,
    )

    with simulate_device("t4"):
        assert check_tensor_core_support()
        info = get_tensor_core_info()
        assert (info["architecture"], info["fp16_tflops"]) == ("Turing", 65)
        assert isinstance(info["estimated_speedup"], float)
        with enable_tensor_cores(dtype=torch.float16, allow_tf32=True) as config:
            assert config.tf32_applies is False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(64, 128, device=device)
    b = torch.randn(128, 32, device=device)
    c = matmul_tensor_core(a, b, dtype=torch.float16)
    assert c.dtype == torch.float32 and c.shape == (64, 32)
    model = optimize_for_tensor_cores(torch.nn.Linear(32, 8), dtype=torch.float16)
    assert not model.training and model(c).shape == (64, 8)
    scaler, autocast = enable_amp(dtype=torch.float16)
    with autocast:
        assert model(c).shape == (64, 8)
    assert scaler is not None
