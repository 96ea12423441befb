"""Host-side cost of each public operation on CPU, beside the native torch call it stands for, in the same run.

On CPU every operation runs a PyTorch implementation, so the difference between a pair (``group``) is what the
library adds per call: validation, describing the call, and dispatch through ``Operation`` (whose choice is
remembered after the first call). Tiny shapes keep the arithmetic negligible. ``dispatch-only`` isolates the
selection machinery: a registered operation whose implementation is the native call itself.

    nox -s bench_host                                   # compare with this CPU model's stored baseline
    python -m pytest benchmarks/host --benchmark-only   # just run (PYTHONPATH: every packages/*/src)

Results are stored under ``benchmarks/results/cpu-<cpu model>/pytest-benchmark/`` (see ``benchmarks/conftest.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_core.selection import Operation

pytestmark = pytest.mark.skipif(
    triton_interpreter_enabled(), reason="host cost is measured with TRITON_INTERPRET unset (interpreted kernels)"
)

torch.manual_seed(0)
torch.set_num_threads(1)  # host cost, not intra-op parallelism (and no contention on a shared machine)
X = torch.randn(4, 64)
W = torch.randn(64)
B = torch.randn(64)
G = torch.randn(4, 128)
U = torch.randn(4, 128)
Q = torch.randn(1, 1, 8, 64)  # [batch, q_len, heads, head_dim]: a decode step
KV = torch.randn(1, 32, 8, 64)
A16 = torch.randn(16, 16)
GROWING = [torch.randn(1, n, 8, 64) for n in range(32, 96)]  # a decode loop: the context grows every step
_step = [0]


def _native_rmsnorm() -> torch.Tensor:
    return F.rms_norm(X, (64,), W, 1e-6)


def _sdpa_decode() -> torch.Tensor:
    out = F.scaled_dot_product_attention(Q.transpose(1, 2), KV.transpose(1, 2), KV.transpose(1, 2))
    return out.transpose(1, 2)


def _next_kv() -> torch.Tensor:
    _step[0] = (_step[0] + 1) % len(GROWING)
    return GROWING[_step[0]]


def _sdpa_growing() -> torch.Tensor:
    kv = _next_kv().transpose(1, 2)
    return F.scaled_dot_product_attention(Q.transpose(1, 2), kv, kv).transpose(1, 2)


def _pairs() -> dict[str, tuple[Callable[[], Any], Callable[[], Any]]]:
    """Per operation: (native torch call, the library's public call)."""
    from llamatelemetry_flashattn import flash_attention_forward
    from llamatelemetry_tensorcore import matmul_tensor_core
    from llamatelemetry_triton import (
        triton_add,
        triton_layernorm,
        triton_rmsnorm,
        triton_softmax,
        triton_swiglu,
    )

    return {
        "layernorm": (lambda: F.layer_norm(X, (64,), W, B), lambda: triton_layernorm(X, W, B)),
        "rmsnorm": (_native_rmsnorm, lambda: triton_rmsnorm(X, W)),
        "softmax": (lambda: torch.softmax(X, -1), lambda: triton_softmax(X)),
        "swiglu": (lambda: F.silu(G) * U, lambda: triton_swiglu(G, U)),
        "add": (lambda: torch.add(X, X), lambda: triton_add(X, X)),
        "attention-decode": (_sdpa_decode, lambda: flash_attention_forward(Q, KV, KV, causal=False)),
        "attention-decode-growing": (_sdpa_growing, lambda: _growing(flash_attention_forward)),
        "matmul": (lambda: A16 @ A16, lambda: matmul_tensor_core(A16, A16)),
    }


def _growing(attention: Callable[..., torch.Tensor]) -> torch.Tensor:
    kv = _next_kv()
    return attention(Q, kv, kv, causal=False)


PAIRS = _pairs()

_DISPATCH_ONLY = Operation("bench.dispatch_only", lambda x: torch.add(x, x), replace=True)
_DISPATCH_ONLY.register("native", lambda x: torch.add(x, x), priority=1, devices={"cpu", "cuda"})


def _dispatch_only() -> torch.Tensor:
    return _DISPATCH_ONLY.run((X,), X)  # type: ignore[no-any-return]


@pytest.mark.parametrize("op", sorted(PAIRS))
@pytest.mark.parametrize("side", ["native", "ours"])
def test_host_cost(benchmark: Any, op: str, side: str) -> None:
    native, ours = PAIRS[op]
    benchmark.group = op
    fn = native if side == "native" else ours
    result = benchmark(fn)
    if op == "attention-decode-growing":  # each call takes the next context: compare on one fixed step
        _step[0] = 0
        expected = native()
        _step[0] = 0
        result = ours()
    else:
        expected = native()
    assert torch.allclose(result, expected, atol=1e-2, rtol=1e-2), f"{op}: the library's result differs"


@pytest.mark.parametrize("side", ["native", "ours"])
def test_dispatch_only(benchmark: Any, side: str) -> None:
    benchmark.group = "dispatch-only"
    result = benchmark(_dispatch_only if side == "ours" else (lambda: torch.add(X, X)))
    assert torch.equal(result, X + X)
