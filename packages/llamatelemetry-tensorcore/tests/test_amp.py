from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from llamatelemetry_core import simulate_device
from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_tensorcore import ReusableAutocast, TensorCoreWarning, enable_amp, plan_amp


def test_cpu_gets_bf16_autocast_and_a_disabled_real_scaler() -> None:
    with simulate_device("cpu"), pytest.warns(TensorCoreWarning, match="bfloat16"):
        scaler, autocast = enable_amp(dtype=torch.float16)
    assert not scaler.is_enabled()
    assert isinstance(autocast, ReusableAutocast)
    assert (autocast.device_type, autocast.dtype) == ("cpu", torch.bfloat16)


def test_the_guide_training_loop_on_cpu() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    criterion = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    true_w = torch.randn(8, 1)
    dataloader = [torch.randn(16, 8) for _ in range(40)]
    with simulate_device("cpu"):
        scaler, autocast = enable_amp(dtype=torch.bfloat16)
    losses = []
    for batch in dataloader:
        target = batch @ true_w
        optimizer.zero_grad()
        with autocast:
            output = model(batch)
            loss = criterion(output, target)
        assert output.dtype == torch.bfloat16
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert not torch.is_autocast_enabled("cpu")


def test_autocast_is_reusable_nested_and_sequential() -> None:
    autocast = ReusableAutocast("cpu", torch.bfloat16)
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    for _ in range(3):
        with autocast:
            with autocast:
                assert torch.mm(a, b).dtype == torch.bfloat16
            assert torch.is_autocast_enabled("cpu")
            assert torch.mm(a, b).dtype == torch.bfloat16
        assert not torch.is_autocast_enabled("cpu")
        assert torch.mm(a, b).dtype == torch.float32


def test_autocast_as_decorator_and_across_threads() -> None:
    autocast = ReusableAutocast("cpu", torch.bfloat16)

    @autocast
    def product(x: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, x)

    results: list[torch.dtype] = []

    def worker() -> None:
        with autocast:
            results.append(torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    with autocast:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert product(torch.ones(2, 2)).dtype == torch.bfloat16
    assert results == [torch.bfloat16] * 4


def test_disabled_autocast_does_nothing() -> None:
    with ReusableAutocast("cpu", torch.bfloat16, enabled=False):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize(
    ("key", "dtype", "expected", "scaler"),
    [
        ("t4", torch.float16, torch.float16, True),
        ("v100", torch.float16, torch.float16, True),
        ("a100", torch.bfloat16, torch.bfloat16, False),
        ("a100", torch.float16, torch.float16, True),
        ("h100", torch.bfloat16, torch.bfloat16, False),
    ],
)
def test_plans_on_simulated_gpus(key: str, dtype: torch.dtype, expected: torch.dtype, scaler: bool) -> None:
    with simulate_device(key) as info:
        plan = plan_amp(info, dtype)
    assert (plan.device_type, plan.dtype, plan.scaler_enabled, plan.warning) == ("cuda", expected, scaler, None)


def test_bf16_on_t4_becomes_fp16_with_a_scaler() -> None:
    with simulate_device("t4") as info:
        with pytest.warns(TensorCoreWarning):
            plan = plan_amp(info, torch.bfloat16)
        with pytest.raises(CapabilityError):
            plan_amp(info, torch.bfloat16, strict=True)
    assert plan.dtype == torch.float16 and plan.scaler_enabled


def test_bad_dtype() -> None:
    with pytest.raises(ConfigurationError, match="expected dtype"):
        enable_amp(dtype=torch.float32)


@pytest.mark.gpu
def test_gpu_amp_step() -> None:
    scaler, autocast = enable_amp(dtype=torch.float16)
    assert scaler.is_enabled() and autocast.device_type == "cuda"
    model = nn.Linear(64, 64).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 64, device="cuda")
    with autocast:
        loss = model(x).float().pow(2).mean()
        assert model(x).dtype == torch.float16
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
