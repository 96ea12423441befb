"""On a GPU: every kernel against its reference at model sizes, in every dtype, under torch.compile and in a CUDA
graph. (The interpreter tests cover awkward shapes; these cover the sizes and dtypes that run in production.)"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import llamatelemetry_triton as lt
from llamatelemetry_core.selection import record_selections
from llamatelemetry_core.testing import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.triton]

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _skip_unsupported(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("bfloat16 needs compute capability >= 8.0")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 768), (32, 768), (4096, 4096), (513, 8192), (64, 16384), (3, 5, 20000)])
def test_norms_match_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    _skip_unsupported(dtype)
    n = shape[-1]
    x = torch.randn(shape, device="cuda", dtype=dtype) * 2 + 1
    r = torch.randn(shape, device="cuda", dtype=dtype)
    w = torch.randn(n, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    with record_selections() as rec:
        y_ln = lt.triton_layernorm(x, w, b)
        y_rms = lt.triton_rmsnorm(x, w)
        y_fused, h = lt.triton_fused_add_rmsnorm(x, r, w)
        y_fused_ln, h_ln = lt.triton_fused_add_layernorm(x, r, w, b)
    assert set(rec.implementations("layernorm") + rec.implementations("fused_add_rmsnorm")) == {"triton"}
    assert_close(y_ln, lt.layernorm_reference(x, w, b))
    assert_close(y_ln, torch.nn.functional.layer_norm(x.float(), (n,), w.float(), b.float()).to(dtype))
    assert_close(y_rms, lt.rmsnorm_reference(x, w))
    want_y, want_h = lt.fused_add_rmsnorm_reference(x, r, w)
    assert torch.equal(h, want_h) and torch.equal(h_ln, want_h)
    assert_close(y_fused, want_y)
    assert_close(y_fused_ln, lt.layernorm_reference(want_h, w, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2048, 4096), (300, 20000)])
def test_norm_backward_matches_autograd(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    _skip_unsupported(dtype)
    n = shape[-1]
    x = torch.randn(shape, device="cuda", dtype=dtype)
    w = torch.randn(n, device="cuda", dtype=dtype)
    b = torch.randn(n, device="cuda", dtype=dtype)
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    cases: list[tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor], tuple[torch.Tensor, ...]]] = [
        (lt.triton_layernorm, lt.layernorm_reference, (w, b)),
        (lt.triton_rmsnorm, lt.rmsnorm_reference, (w,)),
    ]
    for fast, slow, params in cases:
        leaves = [t.clone().requires_grad_(True) for t in (x, *params)]
        ref_leaves = [t.clone().requires_grad_(True) for t in (x, *params)]
        fast(*leaves).backward(dy)  # type: ignore[no-untyped-call]
        slow(*ref_leaves).backward(dy)  # type: ignore[no-untyped-call]
        for got, want in zip(leaves, ref_leaves, strict=True):
            assert got.grad is not None and want.grad is not None
            scale = 1.0 if got.dim() == 2 else float(shape[0]) ** 0.5  # parameter grads sum over rows
            tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}[dtype]
            assert_close(got.grad, want.grad, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "dim"), [((4096, 4096), -1), ((32, 128256), -1), ((64, 262144), 1), ((8, 512, 33), 1)]
)
def test_softmax_matches_reference(dtype: torch.dtype, shape: tuple[int, ...], dim: int) -> None:
    _skip_unsupported(dtype)
    x = torch.randn(shape, device="cuda", dtype=dtype) * 4
    y = lt.triton_softmax(x, dim)
    assert_close(y, lt.softmax_reference(x, dim))
    assert_close(y, torch.softmax(x, dim))
    xg = x.float().requires_grad_(True)
    xr = x.float().requires_grad_(True)
    dy = torch.randn_like(xg)
    lt.triton_softmax(xg, dim).backward(dy)  # type: ignore[no-untyped-call]
    lt.softmax_reference(xr, dim).backward(dy)  # type: ignore[no-untyped-call]
    assert xg.grad is not None and xr.grad is not None
    assert_close(xg.grad, xr.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_glu_rope_match_reference(dtype: torch.dtype) -> None:
    _skip_unsupported(dtype)
    a = torch.randn(4096, 4096, device="cuda", dtype=dtype)
    bias = torch.randn(4096, device="cuda", dtype=dtype)
    assert torch.equal(lt.triton_add(a, a), a + a)
    assert torch.equal(lt.triton_add(a, bias), a + bias)
    assert torch.equal(lt.triton_add(a.t(), bias), a.t() + bias)
    x = torch.randn(64, 2 * 11008, device="cuda", dtype=dtype)
    assert_close(lt.triton_swiglu(x), lt.swiglu_reference(*x.chunk(2, -1)))
    gate, up = x.chunk(2, -1)
    assert_close(lt.triton_geglu(x, approximate="tanh"), lt.geglu_reference(gate, up, "tanh"))
    qkv = torch.randn(2, 128, 32 + 2 * 8, 128, device="cuda", dtype=dtype)
    q, k = qkv[:, :, :32], qkv[:, :, 32:40]
    cos, sin = lt.rope_cos_sin(4096, 128, device="cuda")
    positions = torch.randint(0, 4096, (2, 128), device="cuda")
    want_q, want_k = lt.rope_reference(q, k, cos, sin, positions)
    lt.triton_rope(q, k, cos, sin, positions)
    assert_close(q, want_q)
    assert_close(k, want_k)


def test_torch_compile_matches_eager() -> None:
    def block(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        normed, residual = lt.triton_fused_add_rmsnorm(x, r, w)
        scores = lt.triton_softmax(normed.float(), -1)
        return lt.triton_add(lt.triton_layernorm(scores.to(x.dtype), w), residual) + lt.triton_swiglu(
            torch.cat([normed, residual], -1)
        )

    x = torch.randn(64, 1024, device="cuda", dtype=torch.float16)
    r = torch.randn_like(x)
    w = torch.randn(1024, device="cuda", dtype=torch.float16)
    compiled = torch.compile(block)
    assert_close(compiled(x, r, w), block(x, r, w))
    # training step under compile: gradients flow through the custom ops' autograd
    xg = x.clone().requires_grad_(True)
    compiled(xg, r, w).float().sum().backward()  # type: ignore[no-untyped-call]
    xe = x.clone().requires_grad_(True)
    block(xe, r, w).float().sum().backward()  # type: ignore[no-untyped-call]
    assert xg.grad is not None and xe.grad is not None
    assert_close(xg.grad, xe.grad, atol=1e-2, rtol=1e-2)


def test_custom_ops_are_captured_in_a_cuda_graph() -> None:
    x = torch.randn(32, 4096, device="cuda", dtype=torch.float16)
    r = torch.randn_like(x)
    w = torch.randn(4096, device="cuda", dtype=torch.float16)

    def step() -> tuple[torch.Tensor, ...]:
        y, h = lt.triton_fused_add_rmsnorm(x, r, w)  # eager: the launcher directly
        # the registered custom op itself, as a compiled graph calls it
        y_op, h_op, _, _ = torch.ops.llamatelemetry.triton_norm_fwd(x, r, w, None, 1e-6, True)
        return lt.triton_softmax(y), h, y_op, h_op

    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and warm up outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, h, y_op, h_op = step()
    x.copy_(torch.randn_like(x))  # new inputs in the captured buffers
    graph.replay()
    torch.cuda.synchronize()
    want_y, want_h = lt.fused_add_rmsnorm_reference(x, r, w)
    assert_close(h, want_h)
    assert_close(out, lt.softmax_reference(want_y))
    assert_close(h_op, want_h)
    assert_close(y_op, want_y)


def test_explicit_triton_backend_on_gpu() -> None:
    x = torch.randn(8, 100, device="cuda")
    with record_selections() as rec:
        lt.triton_softmax(x, backend="triton")
        lt.triton_softmax(x, backend="reference")
    assert rec.implementations("softmax") == ["triton", "reference"]
