"""Hostile inputs that once gave wrong answers or raw errors, each pinned down by name."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_tensorcore import ReusableAutocast, enable_tensor_cores, matmul_tensor_core

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CheckMatmul = Callable[..., None]


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(
        DEVICE, torch.float32
    )


@pytest.mark.parametrize("scale", [1e-9, 1e-20, 1e-30])
def test_tiny_inputs_are_scaled_up_not_flushed_to_zero(scale: float, check_matmul: CheckMatmul) -> None:
    a, b = _randn(8, 16, seed=1, scale=scale), _randn(16, 4, seed=2)
    c = matmul_tensor_core(a, b, dtype=torch.float16)
    assert bool((c != 0).any())
    check_matmul(c, a, b, torch.float16)
    check_matmul(matmul_tensor_core(b.T, a.T, dtype=torch.float16), b.T, a.T, torch.float16)


def _exact_grads(a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a64, b64, g64 = a.double().cpu(), b.double().cpu(), grad.double().cpu()
    return g64 @ b64.T, a64.T @ g64


@pytest.mark.parametrize(
    ("scale_a", "scale_b", "k"),
    [(300.0, 1.0, 4096), (1e6, 1.0, 64), (1e-9, 1.0, 64), (1.0, 1e5, 256), (1e4, 1e4, 512)],
)
def test_backward_is_as_range_safe_as_the_forward(
    scale_a: float, scale_b: float, k: int, check_matmul: CheckMatmul
) -> None:
    a = _randn(16, k, seed=3, scale=scale_a).requires_grad_()
    b = _randn(k, 32, seed=4, scale=scale_b).requires_grad_()
    grad = _randn(16, 32, seed=5)
    c = matmul_tensor_core(a, b, dtype=torch.float16)
    assert bool(c.isfinite().all())
    c.backward(grad)  # type: ignore[no-untyped-call]
    assert a.grad is not None and b.grad is not None
    assert bool(a.grad.isfinite().all()) and bool(b.grad.isfinite().all())
    # Each gradient is itself a range-scaled fp16 product: the same error bound as the forward.
    check_matmul(a.grad, grad, b.detach().T, torch.float16)
    check_matmul(b.grad, a.detach().T, grad, torch.float16)


def test_backward_sums_broadcast_batch_dimensions() -> None:
    a = _randn(3, 4, 8, seed=6).requires_grad_()
    b = _randn(8, 5, seed=7).requires_grad_()
    grad = _randn(3, 4, 5, seed=8)
    matmul_tensor_core(a, b).backward(grad)  # type: ignore[no-untyped-call]
    assert b.grad is not None and b.grad.shape == b.shape
    want = torch.einsum("bmk,bmn->kn", a.detach().double(), grad.double())
    torch.testing.assert_close(b.grad.double(), want, rtol=5e-3, atol=5e-3)


def test_switches_must_be_booleans() -> None:
    with pytest.raises(ConfigurationError, match="expected allow_tf32 to be True or False, got 'no'"):
        enable_tensor_cores(allow_tf32="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cudnn_benchmark"):
        enable_tensor_cores(cudnn_benchmark=1)  # type: ignore[arg-type]


def test_autocast_exit_without_enter_is_a_typed_error() -> None:
    autocast = ReusableAutocast("cpu", torch.bfloat16)
    with pytest.raises(ConfigurationError, match="without a matching __enter__"):
        autocast.__exit__(None, None, None)
    with autocast:
        pass  # still usable
