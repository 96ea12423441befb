"""Every kernel against its PyTorch reference, on random shapes, layouts and dtypes (forward and backward).

Runs where Triton can execute kernels: in the interpreter on CPU tensors (``TRITON_INTERPRET=1``, the
cpu-triton matrix) and on a GPU. Shapes stay tiny because the interpreter runs each program in Python; rows
longer than a block are made cheap with a small forced block size.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamatelemetry_core.selection import record_selections
from llamatelemetry_core.testing import assert_close
from llamatelemetry_triton import (
    force_max_block_size,
    fused_add_layernorm_reference,
    fused_add_rmsnorm_reference,
    geglu_reference,
    layernorm_reference,
    rmsnorm_reference,
    rope_cos_sin,
    rope_reference,
    softmax_reference,
    swiglu_reference,
    triton_add,
    triton_fused_add_layernorm,
    triton_fused_add_rmsnorm,
    triton_geglu,
    triton_layernorm,
    triton_rmsnorm,
    triton_rope,
    triton_softmax,
    triton_swiglu,
)
from llamatelemetry_triton._dispatch import device_info
from llamatelemetry_triton.heuristics import NORM_BWD_SUM_BLOCK, NORM_LOOP_BLOCK, LaunchConfig, norm_config
from llamatelemetry_triton.ops._norm_backward import _norm_backward
from llamatelemetry_triton.ops.norm import _norm_forward

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bfloat16 runs the reference under the interpreter (NumPy has no bfloat16): its kernels are compared on GPUs.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
LAYOUTS = ["contiguous", "row_slice", "col_stride", "transposed"]
SETTINGS = settings(
    max_examples=15, deadline=None, derandomize=False, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _random(shape: Sequence[int], dtype: torch.dtype, layout: str, generator: torch.Generator) -> torch.Tensor:
    """A random tensor of ``shape`` laid out as asked: a view of a larger buffer for the strided layouts."""
    shape = list(shape)

    def make(size: list[int]) -> torch.Tensor:
        return (torch.randn(size, generator=generator) * 2 + 0.5).to(dtype=dtype, device=DEVICE)

    if layout == "row_slice" and len(shape) >= 2:  # every other row of a taller buffer
        return make([2 * shape[0], *shape[1:]])[::2]
    if layout == "col_stride" and shape:  # every other element along the last dimension
        return make([*shape[:-1], 2 * shape[-1]])[..., ::2]
    if layout == "transposed" and len(shape) >= 3:  # leading dimensions swapped in memory
        return make([shape[1], shape[0], *shape[2:]]).transpose(0, 1)
    return make(shape)


def _block_cap(cap: int | None) -> contextlib.AbstractContextManager[None]:
    return force_max_block_size(cap) if cap is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _expect_backend(operation: str, backend: str = "triton") -> Iterator[None]:
    with record_selections() as rec:
        yield
    assert rec.last(operation) == backend


def _grads(fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], inputs: list[torch.Tensor], seed: int):  # type: ignore[no-untyped-def]
    """Run ``fn`` on leaf copies of ``inputs``, backpropagate a random gradient; return (outputs, input grads)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
    torch.autograd.backward(list(outs), cotangents)
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


def _check_against(
    fast: Callable[..., Any], slow: Callable[..., Any], inputs: list[torch.Tensor], seed: int, kind: str, tol: float
) -> None:
    """``fast``'s outputs and input gradients match ``slow``'s (outputs at the dtype's tolerance, gradients at
    ``tol``), with the same random cotangents."""
    got_out, got_grads = _grads(fast, inputs, seed)
    want_out, want_grads = _grads(slow, inputs, seed)
    for got, want in zip(got_out, want_out, strict=True):
        assert_close(got, want, name=f"{kind} output")
    for i, (got, want) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert got is not None and want is not None
        assert_close(got, want, atol=tol, rtol=tol, name=f"{kind} grad #{i}")


shapes = st.tuples(
    st.lists(st.integers(1, 3), min_size=0, max_size=2),  # leading dimensions
    st.integers(1, 70),  # normalized / softmax dimension
)


@SETTINGS
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    cap=st.sampled_from([None, 16]),
    affine=st.sampled_from(["both", "weight", "none"]),
    seed=st.integers(0, 2**16),
)
def test_layernorm_matches_reference(
    shape: tuple[list[int], int], dtype: torch.dtype, layout: str, cap: int | None, affine: str, seed: int
) -> None:
    lead, n = shape
    gen = torch.Generator().manual_seed(seed)
    x = _random([*lead, n], dtype, layout, gen)
    w = _random([n], dtype, "contiguous", gen) if affine != "none" else None
    b = _random([n], dtype, "contiguous", gen) if affine == "both" else None
    with _block_cap(cap), _expect_backend("layernorm"):
        y = triton_layernorm(x, w, b, eps=1e-5)
    assert_close(y, layernorm_reference(x, w, b, 1e-5), name="layernorm")
    assert y.shape == x.shape and y.dtype == x.dtype


@SETTINGS
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    cap=st.sampled_from([None, 16]),
    seed=st.integers(0, 2**16),
)
def test_rmsnorm_matches_reference(
    shape: tuple[list[int], int], dtype: torch.dtype, layout: str, cap: int | None, seed: int
) -> None:
    lead, n = shape
    gen = torch.Generator().manual_seed(seed)
    x = _random([*lead, n], dtype, layout, gen)
    w = _random([n], dtype, "contiguous", gen)
    with _block_cap(cap), _expect_backend("rmsnorm"):
        y = triton_rmsnorm(x, w, eps=1e-6)
    assert_close(y, rmsnorm_reference(x, w, 1e-6), name="rmsnorm")


@SETTINGS
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    cap=st.sampled_from([None, 16]),
    layer=st.sampled_from(["rms", "layer"]),
    seed=st.integers(0, 2**16),
)
def test_fused_add_norm_matches_reference(
    shape: tuple[list[int], int], dtype: torch.dtype, layout: str, cap: int | None, layer: str, seed: int
) -> None:
    lead, n = shape
    gen = torch.Generator().manual_seed(seed)
    x = _random([*lead, n], dtype, layout, gen)
    residual = _random([*lead, n], dtype, "contiguous", gen)
    w = _random([n], dtype, "contiguous", gen)
    b = _random([n], dtype, "contiguous", gen) if layer == "layer" else None
    with _block_cap(cap):
        if layer == "rms":
            with _expect_backend("fused_add_rmsnorm"):
                y, h = triton_fused_add_rmsnorm(x, residual, w)
            want_y, want_h = fused_add_rmsnorm_reference(x, residual, w)
        else:
            with _expect_backend("fused_add_layernorm"):
                y, h = triton_fused_add_layernorm(x, residual, w, b)
            want_y, want_h = fused_add_layernorm_reference(x, residual, w, b)
    assert_close(h, want_h, name="residual")
    if dtype == torch.bfloat16:
        # The interpreter rounds fp32 -> bf16 towards zero, and one ulp of h is amplified where weight * xhat
        # and bias nearly cancel: check the norm on the kernel's own h.
        want_y = rmsnorm_reference(h, w) if layer == "rms" else layernorm_reference(h, w, b)
    assert_close(y, want_y, name="normed")


@SETTINGS
@given(
    shape=shapes,
    dtype=st.sampled_from([torch.float32, torch.float16]),
    cap=st.sampled_from([None, 16]),
    kind=st.sampled_from(["layernorm", "rmsnorm", "fused_rms", "fused_layer"]),
    seed=st.integers(0, 2**16),
)
def test_norm_backward_matches_autograd_of_reference(
    shape: tuple[list[int], int], dtype: torch.dtype, cap: int | None, kind: str, seed: int
) -> None:
    lead, n = shape
    gen = torch.Generator().manual_seed(seed)
    x = _random([*lead, n], dtype, "contiguous", gen)
    r = _random([*lead, n], dtype, "contiguous", gen)
    w = _random([n], dtype, "contiguous", gen)
    b = _random([n], dtype, "contiguous", gen)
    fast: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    slow: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    if kind == "layernorm":
        inputs, fast, slow = [x, w, b], triton_layernorm, layernorm_reference
    elif kind == "rmsnorm":
        inputs, fast, slow = [x, w], triton_rmsnorm, rmsnorm_reference
    elif kind == "fused_rms":
        inputs, fast, slow = [x, r, w], triton_fused_add_rmsnorm, fused_add_rmsnorm_reference
    else:
        inputs, fast, slow = [x, r, w, b], triton_fused_add_layernorm, fused_add_layernorm_reference
    with _block_cap(cap):
        got_out, got_grads = _grads(fast, inputs, seed)
    want_out, want_grads = _grads(slow, inputs, seed)
    for got, want in zip(got_out, want_out, strict=True):
        assert_close(got, want, name=f"{kind} output")
    rows = max(1, x.numel() // max(n, 1))
    for i, (got, want) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert got is not None and want is not None
        # weight/bias gradients sum over rows: allow for the different summation order
        scale = 1.0 if got.dim() == x.dim() else float(rows) ** 0.5
        tol = 4.0 if dtype == torch.float16 else 8.0
        assert_close(
            got,
            want,
            atol=1e-5 * tol * scale if dtype == torch.float32 else 4e-3 * scale,
            rtol=1e-4 * tol if dtype == torch.float32 else 4e-3,
            name=f"{kind} grad #{i}",
        )


@pytest.mark.parametrize("params", ["weight", "bias", "none", "both"])
@pytest.mark.parametrize("cap", [None, 16])
def test_norm_backward_with_optional_parameters_absent(params: str, cap: int | None) -> None:
    """dweight and dbias come from one reduction kernel, which must handle either being absent."""
    gen = torch.Generator().manual_seed(7)
    x = _random([5, 3, 37], torch.float32, "row_slice", gen)
    w = _random([37], torch.float32, "contiguous", gen) if params in ("weight", "both") else None
    b = _random([37], torch.float32, "contiguous", gen) if params in ("bias", "both") else None
    inputs = [t for t in (x, w, b) if t is not None]

    def pick(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def call(*leaves: torch.Tensor) -> torch.Tensor:
            it = iter(leaves)
            xl = next(it)
            return fn(xl, next(it) if w is not None else None, next(it) if b is not None else None)

        return call

    with _block_cap(cap), _expect_backend("layernorm"):
        got_out, got_grads = _grads(pick(triton_layernorm), inputs, 3)
    want_out, want_grads = _grads(pick(layernorm_reference), inputs, 3)
    assert_close(got_out[0], want_out[0], name="layernorm output")
    for i, (got, want) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert got is not None and want is not None
        assert_close(got, want, atol=1e-4, rtol=1e-4, name=f"grad #{i}")
    if w is None:  # RMSNorm without a weight: only dx
        with _block_cap(cap), _expect_backend("rmsnorm"):
            got_out, got_grads = _grads(lambda xl: triton_rmsnorm(xl), [x], 5)
        want_out, want_grads = _grads(lambda xl: rmsnorm_reference(xl), [x], 5)
        assert_close(got_grads[0], want_grads[0], atol=1e-4, rtol=1e-4, name="rmsnorm dx")


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "fused_rms", "fused_layer"])
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_norm_backward_of_a_row_past_8192_takes_one_block(kind: str, dtype: torch.dtype) -> None:
    """Rows past 8192 elements (here 8208: a 16384 block, two rows) take a single block: RMSNorm holds it,
    LayerNorm reads it twice."""
    n = 8208
    config = norm_config(n, dtype, device_info(torch.device(DEVICE)), backward=True, layernorm="layer" in kind)
    assert config.single_block and config.reread_row == ("layer" in kind)
    gen = torch.Generator().manual_seed(11)
    x, r = (_random([2, n], dtype, "contiguous", gen) for _ in range(2))
    w, b = (_random([n], dtype, "contiguous", gen) for _ in range(2))
    cases: dict[str, tuple[list[torch.Tensor], Callable[..., object], Callable[..., object]]] = {
        "layernorm": ([x, w, b], triton_layernorm, layernorm_reference),
        "rmsnorm": ([x, w], triton_rmsnorm, rmsnorm_reference),
        "fused_rms": ([x, r, w], triton_fused_add_rmsnorm, fused_add_rmsnorm_reference),
        "fused_layer": ([x, r, w, b], triton_fused_add_layernorm, fused_add_layernorm_reference),
    }
    inputs, fast, slow = cases[kind]
    _check_against(fast, slow, inputs, 5, kind, 8e-3)


@pytest.mark.parametrize("is_rms", [True, False])
def test_every_launch_of_a_long_row_backward_gives_the_same_gradients(is_rms: bool) -> None:
    """The launches a benchmark sweeps at 8208 elements (first read unrolled or looped, in blocks of 2048 or
    4096; the row held; the row looped in blocks) compute the chosen one's dx, dweight and dbias, up to the
    order of the sums."""
    n = 8208
    gen = torch.Generator().manual_seed(3)
    x, dy = (_random([2, n], torch.float16, "contiguous", gen) for _ in range(2))
    w, b = (_random([n], torch.float16, "contiguous", gen) for _ in range(2))
    bias = None if is_rms else b
    _, _, mean, rstd = _norm_forward(x, None, w, bias, 1e-5, is_rms)
    assert rstd is not None
    chosen = norm_config(n, x.dtype, device_info(x.device), backward=True, layernorm=not is_rms)
    assert chosen.single_block and chosen.reread_row == (not is_rms) and chosen.unrolled == 0
    reread = dataclasses.replace(chosen, reread_row=True, chunk_size=NORM_BWD_SUM_BLOCK)
    launches = [
        reread,
        dataclasses.replace(reread, unrolled=reread.block_size // reread.chunk_size),
        dataclasses.replace(reread, chunk_size=4096),
        dataclasses.replace(reread, chunk_size=4096, unrolled=reread.block_size // 4096),
        dataclasses.replace(chosen, reread_row=False, chunk_size=0),
        LaunchConfig(NORM_LOOP_BLOCK, 16, 2, single_block=False),
    ]
    want = _norm_backward(dy, x, None, w, mean, rstd, is_rms, not is_rms, config=chosen)
    for config in launches:
        got = _norm_backward(dy, x, None, w, mean, rstd, is_rms, not is_rms, config=config)
        for i, (g, e) in enumerate(zip(got, want, strict=True)):
            assert (g is None) == (e is None)
            if g is not None and e is not None:
                assert_close(g, e, name=f"{config}: output #{i}")


@SETTINGS
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n=st.integers(1, 300),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    cap=st.sampled_from([None, 16, 64]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_softmax_matches_reference(
    lead: list[int], n: int, dtype: torch.dtype, layout: str, cap: int | None, seed: int, data: st.DataObject
) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = _random([*lead, n], dtype, layout, gen) * 3
    dim = data.draw(st.integers(-x.dim(), x.dim() - 1), label="dim")
    with _block_cap(cap), _expect_backend("softmax"):
        y = triton_softmax(x, dim)
    assert_close(y, softmax_reference(x, dim), name=f"softmax(dim={dim})")


@pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")  # the interpreter's NumPy, on the -inf row
def test_softmax_long_row_is_split_and_handles_infinities() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1000, generator=gen).to(DEVICE)
    x[0, :500] = -float("inf")  # a masked prefix, as in attention
    x[1, 7] = 30.0  # a dominant logit
    with force_max_block_size(16):
        y = triton_softmax(x)
    assert_close(y, softmax_reference(x))
    assert torch.allclose(y.sum(-1).cpu(), torch.ones(3))
    x[2] = -float("inf")  # a fully masked row gives NaN, as torch.softmax does
    with force_max_block_size(16):
        y = triton_softmax(x)
    assert bool(y[2].isnan().all()) and bool(torch.softmax(x, -1)[2].isnan().all())


@SETTINGS
@given(
    shape=shapes,
    dtype=st.sampled_from([torch.float32, torch.float16]),
    cap=st.sampled_from([None, 16]),
    seed=st.integers(0, 2**16),
)
def test_softmax_backward_matches_autograd_of_reference(
    shape: tuple[list[int], int], dtype: torch.dtype, cap: int | None, seed: int
) -> None:
    lead, n = shape
    x = _random([*lead, n], dtype, "contiguous", torch.Generator().manual_seed(seed))
    dim = 0 if x.dim() > 1 and seed % 2 else -1
    with _block_cap(cap):
        got_out, (got,) = _grads(lambda t: triton_softmax(t, dim), [x], seed)
    want_out, (want,) = _grads(lambda t: softmax_reference(t, dim), [x], seed)
    assert got is not None and want is not None
    assert_close(got_out[0], want_out[0])
    assert_close(got, want, name="softmax grad")


broadcast_pairs = st.sampled_from(
    [
        ((5, 7), (5, 7)),
        ((2, 3, 9), (9,)),
        ((4, 1, 6), (1, 5, 6)),
        ((3, 1), (1, 4)),
        ((1,), (2, 3, 2, 2, 3)),
        ((2, 3, 2, 2, 3), (2, 1, 2, 1, 3)),
        ((6,), ()),
        ((0, 3), (3,)),
    ]
)


@SETTINGS
@given(
    shapes_=broadcast_pairs,
    dtypes=st.sampled_from(
        [(torch.float32,) * 2, (torch.float16,) * 2, (torch.float16, torch.float32)]
        + ([(torch.bfloat16,) * 2] if DEVICE == "cuda" else [])
    ),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_add_broadcasts_and_promotes_like_torch(
    shapes_: tuple[tuple[int, ...], tuple[int, ...]], dtypes: tuple[torch.dtype, torch.dtype], layout: str, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = _random(shapes_[0], dtypes[0], layout, gen)
    b = _random(shapes_[1], dtypes[1], "contiguous", gen)
    with _expect_backend("add"):
        out = triton_add(a, b)
    want = torch.add(a, b)
    assert out.dtype == want.dtype and out.shape == want.shape
    assert_close(out, want)
    assert_close(triton_add(a, 0.25), a + 0.25)


def test_add_backward_reduces_broadcast_dimensions() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 1, 6, generator=gen).to(DEVICE), torch.randn(5, 6, generator=gen).to(DEVICE)
    got_out, got = _grads(triton_add, [a, b], 3)
    want_out, want = _grads(torch.add, [a, b], 3)
    assert_close(got_out[0], want_out[0])
    for g, w in zip(got, want, strict=True):
        assert g is not None and w is not None
        assert_close(g, w)


@SETTINGS
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    fused=st.booleans(),
    activation=st.sampled_from(["swiglu", "gelu", "gelu_tanh"]),
    cap=st.sampled_from([None, 16]),
    seed=st.integers(0, 2**16),
)
def test_glu_matches_reference_forward_and_backward(
    lead: list[int], n: int, dtype: torch.dtype, fused: bool, activation: str, cap: int | None, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    fast: Callable[..., torch.Tensor]
    slow: Callable[..., torch.Tensor]
    if activation == "swiglu":
        fast, slow, op = triton_swiglu, swiglu_reference, "swiglu"
    else:
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        fast = lambda g, u=None: triton_geglu(g, u, approximate=approximate)
        slow = lambda g, u: geglu_reference(g, u, approximate)
        op = "geglu"
    if fused:
        x = _random([*lead, 2 * n], dtype, "contiguous", gen)
        with _block_cap(cap), _expect_backend(op):
            y = fast(x)
        assert_close(y, slow(*x.chunk(2, dim=-1)))
        inputs = [x]
        fast_fn: Callable[..., torch.Tensor] = lambda t: fast(t)
        slow_fn: Callable[..., torch.Tensor] = lambda t: slow(*t.chunk(2, dim=-1))
    else:
        g, u = _random([*lead, n], dtype, "col_stride", gen), _random([*lead, n], dtype, "row_slice", gen)
        with _block_cap(cap), _expect_backend(op):
            y = fast(g, u)
        assert_close(y, slow(g, u))
        inputs = [g, u]
        fast_fn, slow_fn = fast, slow
    if dtype == torch.bfloat16:
        return  # backward in bf16 is covered on GPU; one ulp of bf16 dominates the comparison here
    with _block_cap(cap):
        _, got = _grads(fast_fn, inputs, seed)
    _, want = _grads(slow_fn, inputs, seed)
    for got_g, want_g in zip(got, want, strict=True):
        assert got_g is not None and want_g is not None
        assert_close(got_g, want_g, name=f"{activation} grad")


@SETTINGS
@given(
    batch=st.lists(st.integers(1, 2), min_size=0, max_size=1),
    seq=st.integers(1, 5),
    heads=st.tuples(st.integers(1, 5), st.integers(1, 3)),
    head_dim=st.sampled_from([2, 8, 12, 16]),
    partial=st.booleans(),
    interleaved=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    explicit_positions=st.booleans(),
    from_qkv=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rope_matches_reference_in_place(
    batch: list[int],
    seq: int,
    heads: tuple[int, int],
    head_dim: int,
    partial: bool,
    interleaved: bool,
    dtype: torch.dtype,
    explicit_positions: bool,
    from_qkv: bool,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    hq, hk = heads
    rotary = head_dim // 2 if partial and head_dim % 4 == 0 else head_dim
    cos, sin = rope_cos_sin(32, rotary, device=DEVICE)
    if from_qkv:  # q and k as strided views of one fused projection, as models produce them
        qkv = torch.randn([*batch, seq, hq + 2 * hk, head_dim], generator=gen).to(dtype=dtype, device=DEVICE)
        q, k = qkv[..., :hq, :], qkv[..., hq : hq + hk, :]
    else:
        q = torch.randn([*batch, seq, hq, head_dim], generator=gen).to(dtype=dtype, device=DEVICE)
        k = torch.randn([*batch, seq, hk, head_dim], generator=gen).to(dtype=dtype, device=DEVICE)
    positions = torch.randint(0, 32, [*batch, seq], generator=gen).to(DEVICE) if explicit_positions else None
    want_q, want_k = rope_reference(q, k, cos, sin, positions, interleaved)
    before = qkv.clone() if from_qkv else None
    with _expect_backend("rope"):
        out_q, out_k = triton_rope(q, k, cos, sin, positions, interleaved=interleaved)
    assert out_q is q and out_k is k
    assert_close(q, want_q, name="q")
    assert_close(k, want_k, name="k")
    if before is not None:  # the value heads of the fused projection are untouched
        assert torch.equal(qkv[..., hq + hk :, :], before[..., hq + hk :, :])


def test_rope_backward_is_the_inverse_rotation() -> None:
    gen = torch.Generator().manual_seed(5)
    cos, sin = rope_cos_sin(16, 8, device=DEVICE)
    q0 = torch.randn(2, 6, 3, 8, generator=gen).to(DEVICE)
    k0 = torch.randn(2, 6, 1, 8, generator=gen).to(DEVICE)

    def run(apply: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = q0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
        rq, rk = apply(q * 1.0, k * 1.0)  # non-leaf copies: in-place on leaves that need grad is illegal
        ((rq * torch.arange(8.0, device=DEVICE)).sum() + (rk**2).sum()).backward()  # type: ignore[no-untyped-call]
        assert q.grad is not None and k.grad is not None
        return q.grad, k.grad

    got = run(lambda q, k: triton_rope(q, k, cos, sin))
    want = run(lambda q, k: rope_reference(q, k, cos, sin))
    for g, w in zip(got, want, strict=True):
        assert_close(g, w)


@pytest.mark.parametrize("kind", ["layernorm", "fused_layer", "rmsnorm", "fused_rms"])
def test_compiled_training_through_the_custom_ops_matches_the_reference(kind: str) -> None:
    """Under torch.compile the norms run as custom ops: forward and backward, weight and bias requiring grad."""
    gen = torch.Generator().manual_seed(11)
    x = _random([3, 40], torch.float32, "contiguous", gen)
    r = _random([3, 40], torch.float32, "contiguous", gen)
    w = _random([40], torch.float32, "contiguous", gen)
    b = _random([40], torch.float32, "contiguous", gen)
    fast: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    slow: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    if kind == "layernorm":
        inputs, fast, slow = [x, w, b], triton_layernorm, layernorm_reference
    elif kind == "fused_layer":
        inputs, fast, slow = [x, r, w, b], triton_fused_add_layernorm, fused_add_layernorm_reference
    elif kind == "rmsnorm":
        inputs, fast, slow = [x, w], triton_rmsnorm, rmsnorm_reference
    else:
        inputs, fast, slow = [x, r, w], triton_fused_add_rmsnorm, fused_add_rmsnorm_reference
    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: fast(*t, backend="triton"), backend="aot_eager", fullgraph=True)
    _check_against(compiled, slow, inputs, 2, kind, 1e-4)


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("is_rms", [True, False])
def test_norm_custom_ops_pass_opcheck(is_rms: bool, has_bias: bool) -> None:
    """Schema, fake implementations and aliasing rules of the norm custom ops, as torch.library checks them."""
    if is_rms and has_bias:
        pytest.skip("RMSNorm has no bias")
    gen = torch.Generator().manual_seed(5)
    x = _random([2, 3, 24], torch.float32, "contiguous", gen)
    w = _random([24], torch.float32, "contiguous", gen)
    b = _random([24], torch.float32, "contiguous", gen) if has_bias else None
    _, _, mean, rstd = torch.ops.llamatelemetry.triton_norm_fwd(x, None, w, b, 1e-5, is_rms)
    torch.library.opcheck(torch.ops.llamatelemetry.triton_norm_fwd, (x, None, w, b, 1e-5, is_rms))
    dy = _random([2, 3, 24], torch.float32, "contiguous", gen)
    stats = None if is_rms else mean
    torch.library.opcheck(torch.ops.llamatelemetry.triton_norm_bwd, (dy, x, None, w, stats, rstd, is_rms, has_bias))
