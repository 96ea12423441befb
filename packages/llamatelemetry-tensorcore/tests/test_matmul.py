from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamatelemetry_core import record_selections, simulate_device
from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_core.errors import BackendUnavailableError, ConfigurationError
from llamatelemetry_tensorcore import MatmulPadding, matmul_tensor_core, tensor_core_padding
from llamatelemetry_tensorcore.matmul import _compute, range_scale_exponents

CheckMatmul = Callable[..., None]
FP16_MAX = 65504.0


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_numerics_against_fp64(check_matmul: CheckMatmul, input_dtype: torch.dtype, dtype: torch.dtype) -> None:
    seed = torch.seed() % 2**31
    a, b = _randn(37, 53, dtype=input_dtype, seed=seed), _randn(53, 29, dtype=input_dtype, seed=seed + 1)
    c = matmul_tensor_core(a, b, dtype=dtype)
    assert c.dtype == input_dtype and c.shape == (37, 29)
    check_matmul(c, a, b, dtype)


def test_the_guide_example_on_cpu(check_matmul: CheckMatmul) -> None:
    a, b = _randn(64, 128, seed=1), _randn(128, 96, seed=2)
    c = matmul_tensor_core(a, b, dtype=torch.float16)
    assert c.dtype == torch.float32
    check_matmul(c, a, b, torch.float16)
    # the numbers of fp16 inputs multiplied exactly and summed in fp32, rounded once to fp16
    expected = (a.half().float() @ b.half().float()).half().float()
    torch.testing.assert_close(c, expected, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "out_shape"),
    [((4, 9, 13), (4, 13, 7), (4, 9, 7)), ((2, 1, 9, 13), (3, 13, 7), (2, 3, 9, 7)), ((5, 9, 13), (13, 7), (5, 9, 7))],
)
def test_batched_and_broadcast_inputs(
    check_matmul: CheckMatmul, a_shape: tuple[int, ...], b_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> None:
    a, b = _randn(*a_shape, seed=3), _randn(*b_shape, seed=4)
    c = matmul_tensor_core(a, b)
    assert c.shape == out_shape
    check_matmul(c, a, b, torch.float16)


def test_out_is_filled_and_returned(check_matmul: CheckMatmul) -> None:
    a, b = _randn(3, 17, 33, seed=5), _randn(3, 33, 11, seed=6)
    out = torch.full((3, 17, 11), float("nan"))
    result = matmul_tensor_core(a, b, out=out)
    assert result is out
    check_matmul(out, a, b, torch.float16)
    scaled = torch.empty(3, 17, 11)
    matmul_tensor_core(a * 1e5, b, out=scaled)  # the range-scaling path writes into out as well
    check_matmul(scaled, a * 1e5, b, torch.float16)


def test_non_contiguous_inputs(check_matmul: CheckMatmul) -> None:
    a = _randn(40, 24, seed=7)[::2]
    b = _randn(30, 24, seed=8).t()
    check_matmul(matmul_tensor_core(a, b), a, b, torch.float16)


def test_values_beyond_fp16_range_are_scaled_not_inf(check_matmul: CheckMatmul) -> None:
    a = _randn(16, 64, seed=9) * 1e6  # far beyond 65504
    b = _randn(64, 8, seed=10)
    assert a.abs().max() > FP16_MAX
    c = matmul_tensor_core(a, b)
    assert torch.isfinite(c).all()
    check_matmul(c, a, b, torch.float16)


def test_products_beyond_fp16_range_are_scaled_not_inf(check_matmul: CheckMatmul) -> None:
    a = _randn(8, 1024, seed=11).abs() * 300 + 100  # every input in range, every output ~ 4e7
    b = _randn(1024, 8, seed=12).abs() * 300 + 100
    assert a.abs().max() < FP16_MAX
    c = matmul_tensor_core(a, b)
    assert torch.isfinite(c).all() and c.min() > FP16_MAX
    check_matmul(c, a, b, torch.float16)


def test_fp32_max_and_tiny_values() -> None:
    a = torch.tensor([[3.0e38, 0.0], [1e-30, 2e-30]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    c = matmul_tensor_core(a, b)
    assert torch.isfinite(c).all()
    torch.testing.assert_close(c[0], torch.tensor([3.0e38, 0.0]), rtol=1e-3, atol=0)


def test_fp16_inputs_overflow_like_fp16() -> None:
    a = torch.full((2, 4), 200.0, dtype=torch.float16)
    b = torch.full((4, 2), 200.0, dtype=torch.float16)
    assert torch.isinf(matmul_tensor_core(a, b)).all()  # 160000 does not fit the fp16 result dtype
    assert matmul_tensor_core(a.float(), b.float()).eq(160000.0).all()


def test_non_finite_inputs_propagate_without_hurting_other_rows(check_matmul: CheckMatmul) -> None:
    a = _randn(6, 32, seed=13) * 1e5
    b = _randn(32, 5, seed=14)
    a[0, 3] = float("inf")
    a[1, 4] = float("nan")
    c = matmul_tensor_core(a, b)
    assert not torch.isfinite(c[:2]).all(dim=1).any()
    check_matmul(c[2:], a[2:], b, torch.float16)


def test_empty_and_zero_inputs() -> None:
    assert matmul_tensor_core(torch.zeros(3, 4), torch.zeros(4, 5)).eq(0).all()
    assert matmul_tensor_core(torch.ones(3, 0), torch.ones(0, 5)).eq(0).all()
    assert matmul_tensor_core(torch.ones(0, 4), torch.ones(4, 5)).shape == (0, 5)


def test_gradients_flow(check_matmul: CheckMatmul) -> None:
    a = _randn(9, 12, seed=15).requires_grad_()
    b = _randn(12, 7, seed=16).requires_grad_()
    c = matmul_tensor_core(a * 1e5, b)
    c.sum().backward()  # type: ignore[no-untyped-call]
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, 1e5 * b.detach().sum(1).expand(9, 12), rtol=2e-2, atol=0)
    check_matmul(c, a.detach() * 1e5, b.detach(), torch.float16)


def test_cpu_runs_the_reference_and_tensor_core_backend_needs_cuda() -> None:
    a, b = _randn(4, 8, seed=17), _randn(8, 4, seed=18)
    # a CPU runs the reference, or the fused Triton kernel where Triton's interpreter is on (cpu-triton matrix)
    expected = "fused" if triton_interpreter_enabled() else "reference"
    with record_selections() as rec:
        matmul_tensor_core(a, b)
    assert rec.last("matmul_tensor_core") == expected
    with pytest.raises(BackendUnavailableError, match="runs on cuda, not cpu"):
        matmul_tensor_core(a, b, backend="tensor_core")
    with simulate_device("h100"), record_selections() as rec:
        matmul_tensor_core(a, b)  # CPU tensors: the simulated GPU does not apply
    assert rec.last("matmul_tensor_core") == expected
    with record_selections() as rec:
        matmul_tensor_core(a.double(), b.double())  # float64 is not the fused path's
    assert rec.last("matmul_tensor_core") == "reference"


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([[1.0]], torch.ones(1, 1)), {}, TypeError, "expected A to be a torch.Tensor, got list"),
        ((torch.ones(2, 2, dtype=torch.int32), torch.ones(2, 2)), {}, ConfigurationError, "expected A with dtype"),
        ((torch.ones(2, 2), torch.ones(2, 2, dtype=torch.complex64)), {}, ConfigurationError, "expected B with dtype"),
        ((torch.ones(4), torch.ones(4, 2)), {}, ConfigurationError, "expected A with at least 2 dimensions"),
        ((torch.ones(3, 4), torch.ones(5, 2)), {}, ConfigurationError, r"K = A.shape\[-1\] = 4"),
        ((torch.ones(2, 3, 4), torch.ones(3, 4, 2)), {}, ConfigurationError, "broadcastable batch"),
        ((torch.ones(3, 4), torch.ones(4, 2)), {"dtype": torch.float32}, ConfigurationError, "enable_tensor_cores"),
        (
            (torch.ones(3, 4), torch.ones(4, 2)),
            {"out": torch.empty(3, 3)},
            ConfigurationError,
            r"out of shape \[3, 2\]",
        ),
        (
            (torch.ones(3, 4), torch.ones(4, 2)),
            {"out": torch.empty(3, 2, dtype=torch.float64)},
            ConfigurationError,
            "dtype float32",
        ),
        ((torch.ones(3, 4), torch.ones(4, 2, device="meta")), {}, ConfigurationError, "on one device"),
    ],
)
def test_bad_calls_raise_actionable_errors(
    args: tuple[object, object], kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        matmul_tensor_core(*args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("key", ["t4", "h100"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_padded_tensor_core_path_matches_the_specification(
    check_matmul: CheckMatmul, key: str, dtype: torch.dtype
) -> None:
    a, b = _randn(2, 23, 37, seed=19) * 1e5, _randn(37, 13, seed=20)
    with simulate_device(key) as info:
        padding = tensor_core_padding(info, 23, 13, 37, dtype)
    assert padding.any
    c = _compute(a, b, None, dtype, padding, tensor_cores=True)  # fp16/bf16 matmul on the CPU
    assert c.shape == (2, 23, 13) and c.is_contiguous()
    check_matmul(c, a, b, dtype)
    out = torch.empty(2, 23, 13)
    _compute(a, b, out, dtype, padding, tensor_cores=True)
    torch.testing.assert_close(out, c)


def test_padding_policy_per_architecture() -> None:
    with simulate_device("t4") as t4, simulate_device("a100") as a100, simulate_device("h100") as h100:
        assert tensor_core_padding(t4, 1023, 777, 1001) == MatmulPadding(m=1, n=7, k=7)
        assert tensor_core_padding(a100, 1023, 777, 1001) == MatmulPadding(m=0, n=7, k=7)
        assert tensor_core_padding(h100, 1024, 4096, 8192) == MatmulPadding()
    with simulate_device("cpu") as cpu:
        assert tensor_core_padding(cpu, 1023, 777, 1001) == MatmulPadding()


@given(
    key=st.sampled_from(["v100", "t4", "a100", "l4", "h100", "b200"]),
    m=st.integers(1, 5000),
    n=st.integers(1, 5000),
    k=st.integers(1, 5000),
)
@settings(max_examples=60, deadline=None)
def test_padding_is_minimal_and_aligned(key: str, m: int, n: int, k: int) -> None:
    with simulate_device(key) as info:
        pad = tensor_core_padding(info, m, n, k)
    for size, extra in ((n, pad.n), (k, pad.k)):
        assert 0 <= extra < 8 and (size + extra) % 8 == 0
    assert (pad.m == 0) if info.capability_at_least(8, 0) else ((m + pad.m) % 8 == 0 and pad.m < 8)


@given(
    log_a=st.floats(-140, 127),
    log_b=st.floats(-140, 127),
    k=st.integers(1, 1 << 20),
)
@settings(max_examples=200, deadline=None)
def test_range_scales_keep_inputs_and_sums_in_fp16(log_a: float, log_b: float, k: int) -> None:
    a = torch.tensor([[2.0**log_a]], dtype=torch.float32).expand(1, k)
    b = torch.tensor([[2.0**log_b]], dtype=torch.float32).expand(k, 1)
    e_a, e_b = (float(e) for e in range_scale_exponents(a, b))
    assert e_a == int(e_a) and e_b == int(e_b)
    amax_a, amax_b = float(a.max()), float(b.max())
    scaled_a, scaled_b = amax_a * 2.0**-e_a, amax_b * 2.0**-e_b
    assert scaled_a <= 2**15 and scaled_b <= 2**15
    assert k * scaled_a * scaled_b <= 2**15 * (1 + 1e-9)
    # as high in fp16's range as the bounds allow, up or down: one power of two more on either breaks a bound
    for mine, other in ((scaled_a, scaled_b), (scaled_b, scaled_a)):
        assert 2 * mine > 2**15 or k * 2 * mine * other > 2**15
