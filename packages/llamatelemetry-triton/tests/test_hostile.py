"""Hostile inputs that once gave wrong answers or raw errors, each pinned down by name."""

from __future__ import annotations

import threading

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.selection import record_selections
from llamatelemetry_core.testing import assert_close
from llamatelemetry_triton import (
    HAS_TRITON,
    KernelConfig,
    get_kernel,
    list_kernels,
    rope_cos_sin,
    rope_reference,
    softmax_reference,
    triton_fused_add_layernorm,
    triton_fused_add_rmsnorm,
    triton_rmsnorm,
    triton_rope,
    triton_softmax,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def test_rope_with_q_and_k_the_same_tensor_rotates_once() -> None:
    cos, sin = rope_cos_sin(8, 8, device=DEVICE)
    x = _randn(2, 3, 4, 8)
    want, _ = rope_reference(x, x, cos, sin)
    triton_rope(x, x, cos, sin)
    assert_close(x, want, name="q is k")


def test_rope_with_overlapping_views_follows_the_reference() -> None:
    cos, sin = rope_cos_sin(8, 8, device=DEVICE)
    flat = _randn(2 * 3 * 4 * 8 + 8)
    expected = flat.clone()
    q, k = flat[:192].view(2, 3, 4, 8), flat[4:196].view(2, 3, 4, 8)
    q_ref, k_ref = expected[:192].view(2, 3, 4, 8), expected[4:196].view(2, 3, 4, 8)
    rotated_q, rotated_k = rope_reference(q_ref, k_ref, cos, sin)
    q_ref.copy_(rotated_q)
    k_ref.copy_(rotated_k)
    triton_rope(q, k, cos, sin)
    assert_close(flat, expected, name="overlapping q and k")


def test_rope_on_fused_qkv_slices_stays_in_place_and_exact() -> None:
    cos, sin = rope_cos_sin(8, 8, device=DEVICE)
    qkv = _randn(2, 3, 3 * 4 * 8)
    q, k = qkv[..., :32].view(2, 3, 4, 8), qkv[..., 32:64].view(2, 3, 4, 8)
    want_q, want_k = rope_reference(q, k, cos, sin)
    v_before = qkv[..., 64:].clone()
    triton_rope(q, k, cos, sin)
    assert_close(q, want_q, name="q")
    assert_close(k, want_k, name="k")
    assert torch.equal(qkv[..., 64:], v_before)


@pytest.mark.parametrize("tokens", [1, 2, 5])
def test_fused_qkv_slices_are_disjoint_and_a_shifted_view_is_not(tokens: int) -> None:
    # One token is a decode step of batch 1: its views may carry any token stride, and the heads' byte ranges
    # must still decide (a wrong "overlap" costs four extra copies per layer, a wrong "disjoint" a wrong answer).
    from llamatelemetry_triton.ops.rope import _footprints_may_overlap, _token_view

    qkv = _randn(tokens, (4 + 2 * 2) * 8)
    q, k = _token_view(qkv[:, :32].view(tokens, 4, 8)), _token_view(qkv[:, 32:48].view(tokens, 2, 8))
    assert q is not None and k is not None
    assert not _footprints_may_overlap(q, k)
    flat = _randn(tokens * 32 + 4)
    shifted_q = _token_view(flat[: tokens * 32].view(tokens, 4, 8))
    shifted_k = _token_view(flat[4 : 4 + tokens * 32].view(tokens, 4, 8))
    assert shifted_q is not None and shifted_k is not None
    assert _footprints_may_overlap(shifted_q, shifted_k)
    cos, sin = rope_cos_sin(8, 8, device=DEVICE)
    one_q, one_k = qkv[:, :32].view(tokens, 4, 8), qkv[:, 32:48].view(tokens, 2, 8)
    want_q, want_k = rope_reference(one_q, one_k, cos, sin)
    v_before = qkv[:, 48:].clone()
    triton_rope(one_q, one_k, cos, sin)
    assert_close(one_q, want_q, name="q")
    assert_close(one_k, want_k, name="k")
    assert torch.equal(qkv[:, 48:], v_before)


def test_rope_refuses_an_expanded_q() -> None:
    cos, sin = rope_cos_sin(8, 8, device=DEVICE)
    q = _randn(1, 3, 4, 8).expand(2, 3, 4, 8)
    with pytest.raises(ConfigurationError, match="expected q whose elements each have their own memory"):
        triton_rope(q, _randn(2, 3, 4, 8), cos, sin)


def test_rope_with_zero_query_heads_rotates_k() -> None:
    cos, sin = rope_cos_sin(8, 8, device=DEVICE)
    q, k = _randn(2, 3, 0, 8), _randn(2, 3, 2, 8)
    _, want_k = rope_reference(q, k, cos, sin)
    triton_rope(q, k, cos, sin)
    assert_close(k, want_k)


def test_rope_reference_leaves_positions_outside_the_tables_unrotated() -> None:
    cos, sin = rope_cos_sin(6, 8, device=DEVICE)
    q, k = _randn(4, 2, 8), _randn(4, 1, 8, seed=1)
    positions = torch.tensor([0, 6, -1, 5], device=DEVICE)
    got_q, got_k = rope_reference(q, k, cos, sin, positions)
    want_q, want_k = rope_reference(q, k, cos, sin, positions.clamp(0, 5))
    for got, want, given in ((got_q, want_q, q), (got_k, want_k, k)):
        assert_close(got[[0, 3]], want[[0, 3]])
        assert torch.equal(got[[1, 2]], given[[1, 2]])
    empty_cos, empty_sin = rope_cos_sin(0, 8, device=DEVICE)
    got_q, _ = rope_reference(q, k, empty_cos, empty_sin, positions)
    assert torch.equal(got_q, q)


@pytest.mark.skipif(DEVICE != "cuda", reason="positions on a GPU are not checked on the host (CPU ones are refused)")
def test_rope_on_a_gpu_leaves_positions_outside_the_tables_unrotated_like_its_reference() -> None:
    cos, sin = rope_cos_sin(6, 8, device=DEVICE)
    positions = torch.tensor([0, 6, -1, 5], device=DEVICE)
    for dtype in (torch.float16, torch.float32, torch.float64):  # the kernel, and the reference path (float64)
        q, k = _randn(4, 2, 8, dtype=dtype), _randn(4, 1, 8, dtype=dtype, seed=1)
        want_q, want_k = rope_reference(q, k, cos, sin, positions)
        triton_rope(q, k, cos, sin, positions)
        assert_close(q, want_q)
        assert_close(k, want_k)
    torch.cuda.synchronize()  # no device-side assert left behind


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((-1, 8), {}, "max_positions"),
        ((4.5, 8), {}, "max_positions"),
        ((4, 7), {}, "rotary_dim"),
        ((4, 8), {"base": 0.0}, "base"),
        ((4, 8), {"base": float("nan")}, "base"),
        ((4, 8), {"dtype": torch.int32}, "dtype"),
    ],
)
def test_rope_cos_sin_refuses_bad_arguments(args: tuple[object, ...], kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        rope_cos_sin(*args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("positions", [torch.zeros(5, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long)])
def test_rope_positions_of_the_wrong_shape_are_typed_errors(positions: torch.Tensor) -> None:
    cos, sin = rope_cos_sin(8, 8, device=DEVICE)
    with pytest.raises(ConfigurationError, match="positions"):
        triton_rope(_randn(2, 3, 4, 8), _randn(2, 3, 4, 8), cos, sin, positions=positions.to(DEVICE))


def test_fused_norms_refuse_a_missing_residual() -> None:
    x = _randn(2, 8)
    with pytest.raises(TypeError, match=r"expected residual to be a torch\.Tensor, got NoneType"):
        triton_fused_add_rmsnorm(x, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected residual"):
        triton_fused_add_layernorm(x, None)  # type: ignore[arg-type]


def test_registry_arguments_of_the_wrong_type_are_typed_errors() -> None:
    with pytest.raises(TypeError, match="expected name to be a kernel name"):
        get_kernel(["x"])  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"KernelConfig\.meta"):
        KernelConfig("x", meta=[1, 2])  # type: ignore[arg-type]


def test_float64_is_never_downgraded() -> None:
    x = torch.randn(4, 33, dtype=torch.float64, device=DEVICE) * 10
    assert_close(triton_softmax(x), torch.softmax(x, -1), name="softmax fp64")
    assert_close(softmax_reference(x), torch.softmax(x, -1), name="softmax_reference fp64")
    w = torch.randn(33, dtype=torch.float64, device=DEVICE)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert_close(triton_rmsnorm(x, w), want, name="rmsnorm fp64")


@pytest.mark.triton
def test_bfloat16_in_the_interpreter_runs_the_correctly_rounded_reference() -> None:
    x = torch.randn(8, 40).to(DEVICE, torch.bfloat16)
    with record_selections() as rec:
        y = triton_softmax(x)
    expected = "triton" if x.is_cuda else "reference"
    assert rec.last("softmax") == expected
    if not x.is_cuda:
        assert torch.equal(y, softmax_reference(x))


@pytest.mark.triton
def test_interpreter_launches_from_eight_threads() -> None:
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for i in range(4):
                x = torch.randn(3, 17, generator=torch.Generator().manual_seed(seed * 10 + i)).to(DEVICE)
                assert_close(triton_softmax(x), softmax_reference(x))
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.triton
@pytest.mark.skipif(not HAS_TRITON, reason="the registry holds kernels only with Triton")
def test_builtin_kernel_launches_are_bounded_by_their_tensors() -> None:
    assert "add" in list_kernels()
    a, b, out = _randn(10), _randn(10, seed=1), torch.zeros(10, device=DEVICE)
    with pytest.raises(ConfigurationError, match="reaches 1000 elements of A"):
        get_kernel("add").launch(a, b, out, 1000, grid=(1,))
    get_kernel("add").launch(a, b, out, 10, grid=(1,))
    assert_close(out, a + b)
    x, y = _randn(4, 8), torch.empty(4, 8, device=DEVICE)
    with pytest.raises(ConfigurationError, match="of X"):
        get_kernel("softmax").launch(x, y, 8, 8, grid=(5,))
    get_kernel("softmax").launch(x, y, 8, 8, grid=(4,), BLOCK_SIZE=8)
    assert_close(y, softmax_reference(x))


@pytest.mark.triton
def test_a_dispatch_mode_sees_the_inplace_kernel_and_what_it_writes() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):  # type: ignore[no-untyped-call]
        def __init__(self) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    cos, sin = rope_cos_sin(8, 8, device=DEVICE)
    q, k = _randn(1, 3, 2, 8), _randn(1, 3, 2, 8, seed=1)
    want_q, want_k = rope_reference(q, k, cos, sin)
    with Seen() as seen:
        triton_rope(q, k, cos, sin)
    assert any("triton_rope_" in op for op in seen.ops), seen.ops
    assert_close(q, want_q)
    assert_close(k, want_k)
