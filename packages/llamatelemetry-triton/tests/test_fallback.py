"""Without Triton (or on CPU without the interpreter) every function runs its PyTorch reference, observably."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

import llamatelemetry_triton as lt
from llamatelemetry_core.device import simulate_device
from llamatelemetry_core.environment import TRITON_INTERPRET_ENV, triton_devices
from llamatelemetry_core.errors import BackendUnavailableError, ConfigurationError
from llamatelemetry_core.kv_layout import PAD_SLOT, PagedKV
from llamatelemetry_core.selection import (
    CallSpec,
    get_operation,
    record_selections,
    reset_fallback_warnings,
)
from llamatelemetry_core.testing import assert_close

OPERATIONS = [
    "add",
    "argmax",
    "layernorm",
    "rmsnorm",
    "fused_add_rmsnorm",
    "fused_add_layernorm",
    "softmax",
    "rope",
    "rope_paged_write",
    "swiglu",
    "geglu",
    "linear",
    "rmsnorm_linear",
    "fused_add_rmsnorm_linear",
]


def _calls() -> list[tuple[str, Callable[..., object], Callable[[], object]]]:
    """(operation, public call, reference call) on small CPU inputs."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 12, generator=gen)
    r = torch.randn(3, 5, 12, generator=gen)
    w, b = torch.randn(12, generator=gen), torch.randn(12, generator=gen)
    q, k = torch.randn(2, 5, 4, 8, generator=gen), torch.randn(2, 5, 2, 8, generator=gen)
    cos, sin = lt.rope_cos_sin(8, 8)
    v = torch.randn(5, 2, 8, generator=gen)
    slots, positions = torch.tensor([0, 3, PAD_SLOT, 5, 7]), torch.tensor([7, 0, 3, 1, 6])

    def stored(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], **kw: object) -> tuple[torch.Tensor, ...]:
        cache = PagedKV(torch.zeros(2, 4, 2, 8), torch.zeros(2, 4, 2, 8))
        q2, k2 = fn(q[0].clone(), k[0].clone(), v, cos, sin, positions, cache, slots, **kw)
        return q2, k2, cache.key_cache, cache.value_cache

    lin = torch.randn(7, 12, generator=gen)  # a linear layer's weight, for five rows of x
    return [
        ("add", lambda **kw: lt.triton_add(x, w, **kw), lambda: x + w),
        ("argmax", lambda **kw: lt.triton_argmax(x, **kw), lambda: x.argmax(-1)),
        ("layernorm", lambda **kw: lt.triton_layernorm(x, w, b, **kw), lambda: lt.layernorm_reference(x, w, b)),
        ("rmsnorm", lambda **kw: lt.triton_rmsnorm(x, w, **kw), lambda: lt.rmsnorm_reference(x, w)),
        (
            "fused_add_rmsnorm",
            lambda **kw: lt.triton_fused_add_rmsnorm(x, r, w, **kw),
            lambda: lt.fused_add_rmsnorm_reference(x, r, w),
        ),
        (
            "fused_add_layernorm",
            lambda **kw: lt.triton_fused_add_layernorm(x, r, w, b, **kw),
            lambda: lt.fused_add_layernorm_reference(x, r, w, b),
        ),
        ("softmax", lambda **kw: lt.triton_softmax(x, 1, **kw), lambda: lt.softmax_reference(x, 1)),
        (
            "rope",
            lambda **kw: lt.triton_rope(q.clone(), k.clone(), cos, sin, **kw),
            lambda: lt.rope_reference(q, k, cos, sin),
        ),
        (
            "rope_paged_write",
            lambda **kw: stored(lt.triton_rope_paged_write, **kw),
            lambda: stored(lt.rope_paged_write_reference),
        ),
        ("swiglu", lambda **kw: lt.triton_swiglu(x, **kw), lambda: lt.swiglu_reference(*x.chunk(2, -1))),
        ("geglu", lambda **kw: lt.triton_geglu(x, r, **kw), lambda: lt.geglu_reference(x, r)),
        (
            "linear",
            lambda **kw: lt.triton_linear(x[0], lin, b[:7], **kw),
            lambda: lt.linear_reference(x[0], lin, b[:7]),
        ),
        (
            "swiglu_linear",
            lambda **kw: lt.triton_swiglu_linear(torch.cat([x[0], r[0]], -1), lin, **kw),
            lambda: lt.swiglu_linear_reference(torch.cat([x[0], r[0]], -1), lin),
        ),
        (
            "rmsnorm_linear",
            lambda **kw: lt.triton_rmsnorm_linear(x[0], w, lin, **kw),
            lambda: lt.rmsnorm_linear_reference(x[0], w, lin),
        ),
        (
            "fused_add_rmsnorm_linear",
            lambda **kw: lt.triton_fused_add_rmsnorm_linear(x[0], r[0], w, lin, **kw),
            lambda: lt.fused_add_rmsnorm_linear_reference(x[0], r[0], w, lin),
        ),
    ]


def _check_same(got: object, want: object) -> None:
    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert_close(g, w)
    else:
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
        assert_close(got, want)


@pytest.mark.no_triton
def test_without_triton_nothing_is_registered_and_everything_works() -> None:
    assert not lt.HAS_TRITON
    assert lt.list_kernels() == [] and lt.list_kernels(runnable_only=False) == []
    with pytest.raises(KeyError, match="Triton is not installed"):
        lt.get_kernel("add")
    for op, call, reference in _calls():
        with record_selections() as rec:
            got = call()
        assert rec.last(op) == "reference"
        _check_same(got, reference())
        with pytest.raises(BackendUnavailableError, match=r"requested implementation 'triton' cannot run"):
            call(backend="triton")


def test_cpu_tensors_without_the_interpreter_take_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRITON_INTERPRET_ENV, raising=False)
    for op, call, reference in _calls():
        with record_selections() as rec:
            got = call()
        assert rec.implementations(op) == ["reference"], op
        _check_same(got, reference())
        with pytest.raises(BackendUnavailableError, match=r"runs on cuda, not cpu"):
            call(backend="triton")
        _check_same(call(backend="reference"), reference())


def test_reference_path_is_differentiable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRITON_INTERPRET_ENV, raising=False)
    x = torch.randn(4, 6, requires_grad=True)
    w = torch.randn(6, requires_grad=True)
    (lt.triton_layernorm(x, w).sum() + lt.triton_softmax(x, 0)[0].sum() + lt.triton_swiglu(x).sum()).backward()  # type: ignore[no-untyped-call]
    assert x.grad is not None and w.grad is not None


@pytest.mark.parametrize("op", OPERATIONS)
def test_t4_runs_fp16_in_triton_and_bf16_in_the_reference(op: str) -> None:
    operation = get_operation(op)
    with simulate_device("t4") as t4:
        fp16 = {c.name: c.reason for c in operation.explain(CallSpec(device=t4, dtype=torch.float16))}
        bf16 = {c.name: c.reason for c in operation.explain(CallSpec(device=t4, dtype=torch.bfloat16))}
    assert fp16["reference"] is None and bf16["reference"] is None
    if lt.HAS_TRITON:
        assert fp16["triton"] is None
    assert bf16["triton"] is not None
    assert "bfloat16 needs compute capability >= 8.0" in bf16["triton"] or "not installed" in bf16["triton"]
    with simulate_device("h100") as h100:
        reasons = {c.name: c.reason for c in operation.explain(CallSpec(device=h100, dtype=torch.bfloat16))}
    assert (reasons["triton"] is None) == lt.HAS_TRITON


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: lt.triton_layernorm(torch.ones(2, 3), torch.ones(4)), ConfigurationError, r"weight of shape \[3\]"),
        (lambda: lt.triton_layernorm(torch.ones(2, 3, dtype=torch.int64)), ConfigurationError, "floating-point"),
        (lambda: lt.triton_layernorm(torch.ones(2, 3), eps=-1.0), ConfigurationError, "eps"),
        (lambda: lt.triton_layernorm(torch.tensor(1.0)), ConfigurationError, "at least one dimension"),
        (lambda: lt.triton_rmsnorm([1.0, 2.0]), TypeError, "torch.Tensor"),  # type: ignore[arg-type]
        (lambda: lt.triton_fused_add_rmsnorm(torch.ones(2, 3), torch.ones(3)), ConfigurationError, "residual"),
        (lambda: lt.triton_softmax(torch.ones(2, 3), 2), ConfigurationError, r"dim to be an integer in \[-2, 1\]"),
        (lambda: lt.triton_swiglu(torch.ones(2, 3)), ConfigurationError, "even last dimension"),
        (lambda: lt.triton_geglu(torch.ones(2, 4), approximate="fast"), ConfigurationError, "'none' or 'tanh'"),
        (lambda: lt.triton_add("a", torch.ones(1)), TypeError, "torch.Tensor"),  # type: ignore[arg-type]
        (
            lambda: lt.triton_rope(torch.ones(2, 3, 8), torch.ones(3, 3, 8), *lt.rope_cos_sin(4, 8)),
            ConfigurationError,
            "same leading dimensions",
        ),
        (
            lambda: lt.triton_rope(torch.ones(5, 2, 8), torch.ones(5, 1, 8), *lt.rope_cos_sin(4, 8)),
            ConfigurationError,
            "at most 4 positions",
        ),
        (
            lambda: lt.triton_rope(torch.ones(5, 2, 8), torch.ones(5, 1, 8), *lt.rope_cos_sin(4, 8), torch.arange(5)),
            ConfigurationError,
            r"positions in \[0, 4\)",
        ),
        (
            lambda: lt.triton_rope(torch.ones(5, 2, 8), torch.ones(5, 1, 8), *lt.rope_cos_sin(4, 16)),
            ConfigurationError,
            "rotary_dim <= head_dim",
        ),
    ],
)
def test_invalid_arguments_are_explained(call: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_add_falls_back_where_the_kernel_does_not_apply() -> None:
    a = torch.arange(6).reshape(2, 3)
    reset_fallback_warnings()
    # Integers: torch.add, chosen without a warning; where Triton could run on this device, the skip is recorded.
    with warnings.catch_warnings(), record_selections() as rec:
        warnings.simplefilter("error")
        assert torch.equal(lt.triton_add(a, a), a + a)
    assert rec.last("add") == "reference"
    if _triton_applies():
        assert "not int64" in dict(rec.selections[-1].skipped)["triton"]


def _triton_applies() -> bool:
    return lt.HAS_TRITON and "cpu" in triton_devices()
