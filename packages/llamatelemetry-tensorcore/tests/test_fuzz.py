"""Fuzzing the package's public calls with hostile inputs (see ``llamatelemetry_core.testing.fuzz``).

``matmul_tensor_core`` is judged against an fp64 product rounded to A's dtype, with an absolute tolerance set by
the compute dtype's tolerance times ``max(|A| @ |B|)`` (a product's rounding error scales with its terms, not
its result); an infinite exact element may come out NaN where an infinite input meets a value that rounds to zero
in the compute dtype (documented). The switches and helpers must return or raise a typed error naming the
argument.
"""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from llamatelemetry_core.testing.fuzz import TensorSpec, check_call, fuzz_settings, make_tensor, tensor_specs
from llamatelemetry_tensorcore import (
    ReusableAutocast,
    enable_tensor_cores,
    matmul_tensor_core,
    plan_tensor_cores,
    tensor_core_padding,
)
from llamatelemetry_tensorcore._device import runtime_device

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]
SCALES = [1.0, 300.0, 1e6, 1e-9, 1e-30]


def _coarser(compute: torch.dtype, result: torch.dtype) -> torch.dtype:
    """The dtype whose tolerance judges a product computed in ``compute`` and rounded to ``result``."""
    if torch.bfloat16 in (compute, result):
        return torch.bfloat16
    return torch.float16


def _magnitude(a: torch.Tensor, b: torch.Tensor) -> float:
    """max(|A| @ |B|) over finite inputs, in fp64."""
    a64 = torch.nan_to_num(a.detach().double().cpu(), nan=0.0, posinf=0.0, neginf=0.0).abs()
    b64 = torch.nan_to_num(b.detach().double().cpu(), nan=0.0, posinf=0.0, neginf=0.0).abs()
    product = a64 @ b64
    return float(product.max()) if product.numel() else 0.0


@fuzz_settings(ci=40)
@given(
    m=st.integers(0, 5),
    k=st.integers(0, 9),
    n=st.integers(1, 6),
    batch=st.sampled_from([(), (2,), "broadcast", "mismatch"]),
    spec_a=tensor_specs(INPUT_DTYPES),
    spec_b=tensor_specs(INPUT_DTYPES),
    scale_a=st.sampled_from(SCALES),
    scale_b=st.sampled_from(SCALES),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    with_out=st.booleans(),
)
def test_matmul(
    m: int,
    k: int,
    n: int,
    batch: object,
    spec_a: TensorSpec,
    spec_b: TensorSpec,
    scale_a: float,
    scale_b: float,
    dtype: torch.dtype,
    with_out: bool,
) -> None:
    lead_a: tuple[int, ...] = () if batch == () else (2,)
    lead_b: tuple[int, ...] = {"broadcast": (), "mismatch": (3,)}.get(str(batch), lead_a)
    a = make_tensor([*lead_a, m, k], spec_a, device=DEVICE, scale=scale_a)
    b = make_tensor([*lead_b, k, n], spec_b, device=DEVICE, scale=scale_b)
    out = torch.empty((*lead_a, m, n), dtype=a.dtype, device=DEVICE) if with_out else None

    got: list[torch.Tensor] = []

    def call() -> torch.Tensor:
        got.append(matmul_tensor_core(a, b, out, dtype=dtype))
        return got[0]

    def reference() -> torch.Tensor:
        exact = torch.matmul(a.double(), b.double()).to(a.dtype)
        # An infinite input times a value that rounds to zero in the compute dtype is inf * 0 = NaN, where the
        # exact product is infinite: the one place the rounded inputs' IEEE result differs in kind.
        return torch.where(exact.isinf() & got[0].isnan(), got[0], exact)

    outcome = check_call(
        call,
        reference,
        arguments=["A", "B", "dtype", "out"],
        read_only={"A": a, "B": b},
        dtype=_coarser(dtype, a.dtype),
        scale=lambda _: _magnitude(a, b),
        name="matmul_tensor_core",
    )
    valid = dtype != torch.float32 and a.dtype.is_floating_point and b.dtype.is_floating_point and batch != "mismatch"
    assert outcome.raised != valid
    if with_out and not outcome.raised:
        assert outcome.result is out


@fuzz_settings(ci=25)
@given(
    scale_a=st.sampled_from(SCALES),
    scale_b=st.sampled_from(SCALES),
    k=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_matmul_backward(scale_a: float, scale_b: float, k: int, seed: int) -> None:
    a = make_tensor([3, k], TensorSpec(torch.float32, seed=seed), device=DEVICE, scale=scale_a).requires_grad_()
    b = make_tensor([k, 4], TensorSpec(torch.float32, seed=seed + 1), device=DEVICE, scale=scale_b).requires_grad_()
    grad = make_tensor([3, 4], TensorSpec(torch.float32, seed=seed + 2), device=DEVICE)
    matmul_tensor_core(a, b).backward(grad)  # type: ignore[no-untyped-call]
    assert a.grad is not None and b.grad is not None
    a0, b0 = a.detach(), b.detach()
    check_call(
        lambda: a.grad,
        lambda: (grad.double() @ b0.double().T).float(),
        arguments=["A"],
        dtype=torch.float16,
        scale=lambda _: _magnitude(grad, b0.T),
        name="dA",
    )
    check_call(
        lambda: b.grad,
        lambda: (a0.double().T @ grad.double()).float(),
        arguments=["B"],
        dtype=torch.float16,
        scale=lambda _: _magnitude(a0.T, grad),
        name="dB",
    )


flags = st.one_of(st.booleans(), st.sampled_from(["no", 0, 1, None, 1.0]))


@fuzz_settings(ci=30)
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.int8, "fp16", None]),
    allow_tf32=flags,
    cudnn_benchmark=flags,
    reduced=flags,
)
def test_switches(dtype: object, allow_tf32: object, cudnn_benchmark: object, reduced: object) -> None:
    _, info = runtime_device(None)
    outcome = check_call(
        lambda: plan_tensor_cores(
            info,
            dtype,  # type: ignore[arg-type]
            allow_tf32,  # type: ignore[arg-type]
            cudnn_benchmark=cudnn_benchmark,  # type: ignore[arg-type]
            reduced_precision_reduction=reduced,  # type: ignore[arg-type]
        ),
        None,
        arguments=["dtype", "allow_tf32", "cudnn_benchmark", "reduced_precision_reduction"],
        name="plan_tensor_cores",
    )
    bools = all(isinstance(v, bool) for v in (allow_tf32, cudnn_benchmark, reduced))
    if not bools:
        assert outcome.raised
    if not outcome.raised:
        with enable_tensor_cores(dtype, allow_tf32, cudnn_benchmark=cudnn_benchmark):  # type: ignore[arg-type]
            pass


@fuzz_settings(ci=30)
@given(steps=st.lists(st.sampled_from(["enter", "exit"]), max_size=6))
def test_autocast_enter_exit_sequences(steps: list[str]) -> None:
    autocast = ReusableAutocast("cpu", torch.bfloat16)
    depth = 0
    for step in steps:
        if step == "enter":
            autocast.__enter__()
            depth += 1
        else:
            outcome = check_call(lambda: autocast.__exit__(None, None, None), None, arguments=["__enter__"])
            assert outcome.raised == (depth == 0)
            depth = max(0, depth - 1)
    for _ in range(depth):
        autocast.__exit__(None, None, None)
    assert not torch.is_autocast_enabled("cpu")


@fuzz_settings(ci=30)
@given(m=st.integers(0, 50), n=st.integers(0, 50), k=st.integers(0, 50))
def test_padding_is_small_and_aligned(m: int, n: int, k: int) -> None:
    _, info = runtime_device(None)
    pad = tensor_core_padding(info, m, n, k)
    for size, extra in ((m, pad.m), (n, pad.n), (k, pad.k)):
        assert 0 <= extra < 8
        assert extra == 0 or (size + extra) % 8 == 0
