"""pytest-benchmark timings of ``matmul_tensor_core`` beside ``torch.matmul`` on one GPU.

Run on a GPU machine: ``pytest benchmarks/tensorcore --benchmark-only`` (skipped without CUDA by the ``gpu``
marker). Each case is captured ``launches`` times in one CUDA graph and each round replays it and synchronizes
(see ``benchmarks/conftest.py``). Cases: fp16 inputs at 1024^3 and 4096^3 beside ``torch.matmul`` in fp16, and
fp32 inputs at 1024^3 (conversion and range scaling included) beside ``torch.matmul`` in fp32 with TF32 off,
the product it stands in for. TFLOP/s (``2 M N K`` per call) of both are in the library row's ``extra_info``.
Before timing, each result is checked once against an fp64 product within the error bound of fp16 inputs and
fp32 sums (the bound of the package's tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from llamatelemetry_core.testing.bench import CapturedPair

pytestmark = pytest.mark.gpu

# name: (size of the cube, input dtype, launches per replay: about a millisecond of work on an H200)
CASES: dict[str, tuple[int, torch.dtype, int]] = {
    "fp16-1024": (1024, torch.float16, 100),
    "fp16-4096": (4096, torch.float16, 5),
    "fp32-1024": (1024, torch.float32, 20),
}


def check_product(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, splits: int = 4) -> None:
    """``c`` is ``a @ b`` from fp16-rounded inputs with fp32 sums: elementwise within
    ``(2 + splits) u (|a| @ |b|) + u_out |a @ b|`` (cuBLAS may reduce ``splits`` partial sums in fp16)."""
    a64, b64 = a.double(), b.double()
    ref = a64 @ b64
    u = float(torch.finfo(torch.float16).eps) / 2
    u_out = max(u, float(torch.finfo(c.dtype).eps) / 2)
    bound = (2 + splits) * u * (a64.abs() @ b64.abs()) + u_out * ref.abs()
    bad = (c.double() - ref).abs() > bound
    assert not bool(bad.any()), f"matmul_tensor_core: {int(bad.sum())} of {bad.numel()} elements beyond the bound"


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest, recorded: Any) -> Iterator[CapturedPair]:
    from llamatelemetry_tensorcore import matmul_tensor_core

    size, dtype, launches = CASES[request.param]
    gen = torch.Generator(device="cuda").manual_seed(size)
    a = torch.randn(size, size, device="cuda", dtype=dtype, generator=gen)
    b = torch.randn(size, size, device="cuda", dtype=dtype, generator=gen)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 baseline is true fp32 (captured with the setting)
    try:
        check_product(matmul_tensor_core(a, b), a, b)
        ours: Callable[[], object] = lambda: matmul_tensor_core(a, b)
        _, chosen = recorded(ours)  # Tensor Cores, not the reference, are what gets timed
        yield CapturedPair.capture(
            f"tensorcore matmul {request.param}",
            ours,
            lambda: a @ b,
            launches=launches,
            baseline_name="torch.matmul",
            flops=2 * size**3,
            implementations=chosen,
        )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.parametrize("side", ["tensorcore", "torch"])
def test_matmul(gpu_bench: Any, case: CapturedPair, side: str) -> None:
    gpu_bench.pair(case, ours=side == "tensorcore")
