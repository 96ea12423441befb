"""Every public operation of the component through core's conformance suite."""

from __future__ import annotations

from typing import Any

import torch

import llamatelemetry_triton as lt
from llamatelemetry_core.kv_layout import PAD_SLOT, PagedKV
from llamatelemetry_core.testing.conformance import Conformance, conformance_tests
from llamatelemetry_triton.ops.add import ADD
from llamatelemetry_triton.ops.argmax import ARGMAX
from llamatelemetry_triton.ops.glu import GEGLU, SWIGLU
from llamatelemetry_triton.ops.linear import FUSED_ADD_RMSNORM_LINEAR, LINEAR, RMSNORM_LINEAR, SWIGLU_LINEAR
from llamatelemetry_triton.ops.norm import FUSED_ADD_RMSNORM, LAYERNORM, RMSNORM
from llamatelemetry_triton.ops.rope import ROPE
from llamatelemetry_triton.ops.rope_paged import ROPE_PAGED_WRITE
from llamatelemetry_triton.ops.softmax import SOFTMAX

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rows(gen: torch.Generator, dtype: torch.dtype, device: torch.device, cols: int = 37) -> torch.Tensor:
    return torch.randn(3, 5, cols, generator=gen).to(dtype).to(device)


def _rope_inputs(gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    cos, sin = lt.rope_cos_sin(16, 8, device=device)
    q = torch.randn(2, 7, 3, 8, generator=gen).to(dtype).to(device)
    k = torch.randn(2, 7, 1, 8, generator=gen).to(dtype).to(device)
    return q, k, cos, sin


def _rope_paged_inputs(gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    cos, sin = lt.rope_cos_sin(40, 8, device=device)
    qkv = torch.randn(5, (3 + 2 * 1) * 8, generator=gen).to(dtype).to(device)
    q, k, v = (qkv[:, a:b].reshape(5, -1, 8) for a, b in ((0, 24), (24, 32), (32, 40)))
    positions = torch.randint(0, 40, (5,), generator=gen).to(device)
    key_cache, value_cache = (torch.randn(3, 4, 1, 8, generator=gen).to(dtype).to(device) for _ in range(2))
    slots = torch.randperm(12, generator=gen)[:5]
    slots[1] = PAD_SLOT
    return q, k, v, cos, sin, positions, key_cache, value_cache, slots.to(device)


def _rope_paged_write(*args: Any, backend: str | None = None) -> tuple[torch.Tensor, ...]:
    """The fused call on the conformance inputs; its result is q, k and the store, all compared."""
    q, k, v, cos, sin, positions, key_cache, value_cache, slots = args
    cache = PagedKV(key_cache, value_cache)
    lt.triton_rope_paged_write(q, k, v, cos, sin, positions, cache, slots, backend=backend)
    return q, k, key_cache, value_cache


def _linear_inputs(gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    x = torch.randn(1, 3, 37, generator=gen).to(dtype).to(device)  # three rows: the few-row kernel takes them
    weight = (torch.randn(11, 37, generator=gen) * 0.2).to(dtype).to(device)
    return x, weight, torch.randn(11, generator=gen).to(dtype).to(device)


def _norm_linear_inputs(gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    x, weight, bias = _linear_inputs(gen, dtype, device)
    return x, torch.rand(37, generator=gen).to(dtype).to(device), weight, bias


def _swiglu_linear_inputs(gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    _, weight, bias = _linear_inputs(gen, dtype, device)
    return torch.randn(3, 2 * weight.shape[1], generator=gen).to(dtype).to(device), weight, bias


def _add_norm_linear_inputs(gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    x, norm_weight, weight, bias = _norm_linear_inputs(gen, dtype, device)
    return x, torch.randn(x.shape, generator=gen).to(dtype).to(device), norm_weight, weight, bias


SUITES = {
    "softmax": Conformance(SOFTMAX, lt.triton_softmax, lambda g, d, dev: (_rows(g, d, dev),)),
    "argmax": Conformance(ARGMAX, lt.triton_argmax, lambda g, d, dev: (_rows(g, d, dev),)),
    "add": Conformance(ADD, lt.triton_add, lambda g, d, dev: (_rows(g, d, dev), _rows(g, d, dev))),
    "rmsnorm": Conformance(
        RMSNORM, lt.triton_rmsnorm, lambda g, d, dev: (_rows(g, d, dev), torch.rand(37, generator=g).to(d).to(dev))
    ),
    "layernorm": Conformance(
        LAYERNORM,
        lt.triton_layernorm,
        lambda g, d, dev: (_rows(g, d, dev), torch.rand(37, generator=g).to(d).to(dev), _rows(g, d, dev)[0, 0]),
    ),
    "fused_add_rmsnorm": Conformance(
        FUSED_ADD_RMSNORM,
        lt.triton_fused_add_rmsnorm,
        lambda g, d, dev: (_rows(g, d, dev), _rows(g, d, dev), torch.rand(37, generator=g).to(d).to(dev)),
    ),
    "swiglu": Conformance(SWIGLU, lt.triton_swiglu, lambda g, d, dev: (_rows(g, d, dev), _rows(g, d, dev))),
    "geglu": Conformance(GEGLU, lt.triton_geglu, lambda g, d, dev: (_rows(g, d, dev), _rows(g, d, dev))),
    "rope": Conformance(ROPE, lt.triton_rope, _rope_inputs),
    "rope_paged_write": Conformance(ROPE_PAGED_WRITE, _rope_paged_write, _rope_paged_inputs),
    "linear": Conformance(LINEAR, lt.triton_linear, _linear_inputs),
    "rmsnorm_linear": Conformance(RMSNORM_LINEAR, lt.triton_rmsnorm_linear, _norm_linear_inputs),
    "swiglu_linear": Conformance(SWIGLU_LINEAR, lt.triton_swiglu_linear, _swiglu_linear_inputs),
    "fused_add_rmsnorm_linear": Conformance(
        FUSED_ADD_RMSNORM_LINEAR, lt.triton_fused_add_rmsnorm_linear, _add_norm_linear_inputs
    ),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


(
    test_every_implementation_matches_the_reference,
    test_fullgraph_compile_and_the_backend_variable,
    test_cuda_graph_capture_and_replay,
) = conformance_tests(SUITES, DTYPES, DEVICE)
