"""pytest-benchmark timings of the llamatelemetry-triton kernels beside PyTorch's own call, fp16, on one GPU.

Run on a GPU machine: ``pytest benchmarks/triton --benchmark-only`` (skipped without CUDA by the ``gpu`` marker).
Each case is captured ``LAUNCHES`` times in one CUDA graph and each round replays it and synchronizes (see
``benchmarks/conftest.py``), so the time is GPU work only. Shapes are LLM activations whose inputs and outputs
are several times an H200's L2 cache, so every launch streams from memory. Each group holds the Triton kernel
and the PyTorch call it replaces (``F.rms_norm``, ``F.layer_norm``, ``torch.softmax``, ...); the kernel's row
carries GB/s, its share of the copy bandwidth of the run and the same figures for PyTorch in ``extra_info``.
Before timing, each kernel's output is checked once against the package's fp32 reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from llamatelemetry_core.testing.bench import CapturedPair

pytestmark = pytest.mark.gpu

FP16 = torch.float16
LAUNCHES = 10
ROWS_SHAPES = [(16384, 4096), (4096, 16384)]  # tokens x hidden: a long prefill of an 8B model, a 405B hidden size
SOFTMAX_SHAPES = [(16384, 4096), (256, 128256)]  # attention-score rows; a batch of logits over Llama 3's vocabulary
SWIGLU_SHAPE = (8192, 14336)  # tokens x an 8B model's intermediate size
ROPE_SHAPE = (8192, 32, 8, 128)  # tokens, query heads, KV heads, head dim (Llama 3 8B)


@dataclass
class Case:
    """One operation on one shape: the Triton call, the PyTorch call, bytes each moves, the correctness check."""

    ours: Callable[[], object]
    torch_call: Callable[[], object]
    moved_bytes: int
    check: Callable[[Callable[..., None]], None]


def _key(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _rows(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", dtype=FP16, generator=gen)
    residual = torch.randn(shape, device="cuda", dtype=FP16, generator=gen)
    weight = 1 + 0.1 * torch.randn(shape[1], device="cuda", dtype=FP16, generator=gen)
    bias = 0.1 * torch.randn(shape[1], device="cuda", dtype=FP16, generator=gen)
    return x, residual, weight, bias


def _rmsnorm(shape: tuple[int, int]) -> Case:
    from llamatelemetry_triton import rmsnorm_reference, triton_rmsnorm

    x, _, w, _ = _rows(shape)
    n = shape[1]

    def check(close: Callable[..., None]) -> None:
        close(triton_rmsnorm(x, w), rmsnorm_reference(x, w), name="rmsnorm")

    return Case(lambda: triton_rmsnorm(x, w), lambda: F.rms_norm(x, (n,), w, 1e-6), 2 * x.nbytes, check)


def _layernorm(shape: tuple[int, int]) -> Case:
    from llamatelemetry_triton import layernorm_reference, triton_layernorm

    x, _, w, b = _rows(shape)
    n = shape[1]

    def check(close: Callable[..., None]) -> None:
        close(triton_layernorm(x, w, b), layernorm_reference(x, w, b), name="layernorm")

    return Case(lambda: triton_layernorm(x, w, b), lambda: F.layer_norm(x, (n,), w, b), 2 * x.nbytes, check)


def _fused_add_rmsnorm(shape: tuple[int, int]) -> Case:
    from llamatelemetry_triton import fused_add_rmsnorm_reference, triton_fused_add_rmsnorm

    x, r, w, _ = _rows(shape)
    n = shape[1]

    def unfused() -> tuple[torch.Tensor, torch.Tensor]:
        h = x + r
        return F.rms_norm(h, (n,), w, 1e-6), h

    def check(close: Callable[..., None]) -> None:
        (y, h), (y_ref, h_ref) = triton_fused_add_rmsnorm(x, r, w), fused_add_rmsnorm_reference(x, r, w)
        close(h, h_ref, name="fused add+rmsnorm: residual sum")
        close(y, y_ref, name="fused add+rmsnorm: normed")

    # Read x and the residual, write the normed output and the new residual.
    return Case(lambda: triton_fused_add_rmsnorm(x, r, w), unfused, 4 * x.nbytes, check)


def _softmax(shape: tuple[int, int]) -> Case:
    from llamatelemetry_triton import softmax_reference, triton_softmax

    x = 4 * _rows(shape)[0]

    def check(close: Callable[..., None]) -> None:
        close(triton_softmax(x), softmax_reference(x), name="softmax")

    return Case(lambda: triton_softmax(x), lambda: torch.softmax(x, -1), 2 * x.nbytes, check)


def _swiglu(shape: tuple[int, int]) -> Case:
    from llamatelemetry_triton import swiglu_reference, triton_swiglu

    gen = torch.Generator(device="cuda").manual_seed(1)
    gate = torch.randn(shape, device="cuda", dtype=FP16, generator=gen)
    up = torch.randn(shape, device="cuda", dtype=FP16, generator=gen)

    def check(close: Callable[..., None]) -> None:
        close(triton_swiglu(gate, up), swiglu_reference(gate, up), name="swiglu")

    return Case(lambda: triton_swiglu(gate, up), lambda: F.silu(gate) * up, 3 * gate.nbytes, check)


def _rope(shape: tuple[int, int, int, int]) -> Case:
    from llamatelemetry_triton import rope_cos_sin, rope_reference, triton_rope

    tokens, heads, kv_heads, head_dim = shape
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(1, tokens, heads, head_dim, device="cuda", dtype=FP16, generator=gen)
    k = torch.randn(1, tokens, kv_heads, head_dim, device="cuda", dtype=FP16, generator=gen)
    cos, sin = rope_cos_sin(tokens, head_dim, 500000.0, device="cuda")

    def check(close: Callable[..., None]) -> None:
        q_ref, k_ref = rope_reference(q, k, cos, sin)
        q_ours, k_ours = triton_rope(q.clone(), k.clone(), cos, sin)
        close(q_ours, q_ref, name="rope: q")
        close(k_ours, k_ref, name="rope: k")

    # In place, replayed: q and k keep rotating, which changes no byte counts. PyTorch: the reference (rotated
    # copies), the same reads and writes.
    return Case(
        lambda: triton_rope(q, k, cos, sin), lambda: rope_reference(q, k, cos, sin), 2 * (q.nbytes + k.nbytes), check
    )


CASES: dict[str, Callable[[], Case]] = {
    **{f"rmsnorm-{_key(s)}": functools.partial(_rmsnorm, s) for s in ROWS_SHAPES},
    **{f"layernorm-{_key(s)}": functools.partial(_layernorm, s) for s in ROWS_SHAPES},
    **{f"fused_add_rmsnorm-{_key(s)}": functools.partial(_fused_add_rmsnorm, s) for s in ROWS_SHAPES},
    **{f"softmax-{_key(s)}": functools.partial(_softmax, s) for s in SOFTMAX_SHAPES},
    f"swiglu-{_key(SWIGLU_SHAPE)}": lambda: _swiglu(SWIGLU_SHAPE),
    f"rope-{_key(ROPE_SHAPE)}": lambda: _rope(ROPE_SHAPE),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request: pytest.FixtureRequest, close: Callable[..., None], recorded: Any) -> CapturedPair:
    built = CASES[request.param]()
    built.check(close)
    _, chosen = recorded(built.ours)  # the Triton kernel, not the fallback, is what gets timed
    return CapturedPair.capture(
        f"triton {request.param} fp16",
        built.ours,
        built.torch_call,
        launches=LAUNCHES,
        moved_bytes=built.moved_bytes,
        implementations=chosen,
    )


@pytest.mark.parametrize("side", ["triton", "torch"])
def test_triton(gpu_bench: Any, case: CapturedPair, side: str) -> None:
    gpu_bench.pair(case, ours=side == "triton")
