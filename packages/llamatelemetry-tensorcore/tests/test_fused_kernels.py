"""The fused path against the reference: on a GPU, or in Triton's interpreter on CPU tensors (tiny shapes)."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from llamatelemetry_core import record_selections
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_tensorcore import matmul_tensor_core
from llamatelemetry_tensorcore.fused_matmul import _fused_op
from llamatelemetry_tensorcore.matmul import _exponents_from_maxima, product_thresholds

pytest.importorskip("triton")

import triton
import triton.language as tl

from llamatelemetry_tensorcore import _fused_kernels
from llamatelemetry_tensorcore._fused_kernels import _range_exponents, fused_matmul

pytestmark = pytest.mark.triton

CheckMatmul = Callable[..., None]
KernelLaunches = Callable[[str], Any]  # the kernel_launches fixture (conftest.py)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def _quiet_numpy() -> Iterator[None]:
    # The interpreter multiplies with NumPy, which warns where inf meets 0 (the NaN the specification expects).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        warnings.filterwarnings("ignore", "overflow encountered in cast", RuntimeWarning)  # fp16 results: inf
        yield


def _randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def _same_specification(got: torch.Tensor, a: torch.Tensor, b: torch.Tensor, check: CheckMatmul) -> None:
    """``got`` (the fused path) against the reference: the same non-finite elements, the same dtype and shape, and
    the finite ones within the error bound the cuBLAS path is held to (only the order of fp32 sums differs)."""
    ref = matmul_tensor_core(a, b, backend="reference")
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), ref.isinf())
    assert torch.equal(got[got.isinf()], ref[ref.isinf()])
    rows = torch.isfinite(ref).all(dim=-1)
    if bool(rows.any()) and a.dim() == 2 and b.dim() == 2:
        check(got[rows], a[rows], b, torch.float16)
    elif torch.isfinite(ref).all():
        check(got, a, b, torch.float16)


def _fused(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    with record_selections() as rec:
        got = matmul_tensor_core(a, b, out, backend="fused")
    assert rec.last("matmul_tensor_core") == "fused"
    return got


@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 1, 1), (5, 7, 3), (17, 1, 9), (1, 40, 1), (33, 19, 47), (3, 100, 2), (16, 32, 16)]
)
@pytest.mark.parametrize(("scale_a", "scale_b"), [(1.0, 1.0), (1e30, 1e-25), (1e-30, 1e-5), (3e5, 2e3), (1e-20, 1e-20)])
def test_fused_matches_the_reference(
    check_matmul: CheckMatmul, m: int, k: int, n: int, scale_a: float, scale_b: float
) -> None:
    a, b = _randn(m, k, seed=m * k) * scale_a, _randn(k, n, seed=k + n) * scale_b
    _same_specification(_fused(a, b), a, b, check_matmul)


def test_largest_and_smallest_fp32_values(check_matmul: CheckMatmul) -> None:
    tiny = torch.finfo(torch.float32).tiny
    a = torch.tensor([[3.0e38, 0.0, 1e-30], [tiny, 2 * tiny, 0.0], [1e-45, 3e-45, 0.0]], device=DEVICE)
    b = torch.tensor([[1.0, 0.5], [0.0, 1.0], [2.0, -1.0]], device=DEVICE)
    _same_specification(_fused(a, b), a, b, check_matmul)
    subnormal = torch.full((4, 3), 1e-42, device=DEVICE)  # scaled up by 2^154: exact, nothing flushed to zero
    got = _fused(subnormal, b)
    assert torch.equal(got, matmul_tensor_core(subnormal, b, backend="reference")) and got.abs().max() > 0


def test_non_finite_inputs_and_zeros(check_matmul: CheckMatmul) -> None:
    a = _randn(7, 20, seed=1) * 1e5
    b = _randn(20, 6, seed=2)
    a[0, 3], a[1, 4], a[2, 5] = float("inf"), float("nan"), float("-inf")
    b[7, 2] = float("nan")
    _same_specification(_fused(a, b), a, b, check_matmul)
    zeros = torch.zeros(5, 9, device=DEVICE)
    assert _fused(zeros, _randn(9, 4, seed=3)).eq(0).all()
    all_inf = torch.full((2, 3), float("inf"), device=DEVICE)  # no finite value at all: no scaling, inf * 1 = inf
    positive = _randn(3, 2, seed=4).abs() + 1
    _same_specification(_fused(all_inf, positive), all_inf, positive, check_matmul)


def test_out_batches_strides_and_mixed_dtypes(check_matmul: CheckMatmul) -> None:
    a, b = _randn(3, 9, 13, seed=5) * 1e6, _randn(3, 13, 7, seed=6)
    out = torch.full((3, 9, 7), float("nan"), device=DEVICE)
    assert _fused(a, b, out) is out  # same batch
    for i in range(3):
        check_matmul(out[i], a[i], b[i], torch.float16)
    folded = _fused(a, b[0])  # B of 2 dimensions: A's batch folds into M
    torch.testing.assert_close(folded, matmul_tensor_core(a, b[0], backend="reference"), rtol=2e-3, atol=0)
    broadcast = _fused(a[0], b)  # A of 2 dimensions against a batch of B: stride 0
    _same_specification(broadcast, a[0].expand(3, -1, -1), b, check_matmul)
    strided_out = torch.empty(7, 9, device=DEVICE).t()  # written through its strides
    _fused(a[0], b[0], strided_out)
    check_matmul(strided_out, a[0], b[0], torch.float16)
    a_t = _randn(13, 9, seed=7).t()  # transposed and sliced operands
    b_s = _randn(13, 14, seed=8)[:, ::2]
    _same_specification(_fused(a_t, b_s), a_t, b_s, check_matmul)
    half = _randn(9, 13, seed=9, dtype=torch.float16)  # fp16 A, fp32 B: both scaled, the result in fp16
    got = _fused(half, b[0] * 1e4)
    assert got.dtype == torch.float16
    _same_specification(got, half, b[0] * 1e4, check_matmul)


@pytest.mark.parametrize("launches", [1, 2])
def test_out_sharing_storage_with_an_input_gets_the_reference_result(launches: int) -> None:
    # Programs store their tiles while others still read A and B: an aliased out must not be written in place.
    a, b = _randn(24, 24, seed=30) * 1e5, _randn(24, 24, seed=31)
    want = matmul_tensor_core(a, b, backend="reference")
    for which in ("a", "b"):
        x, y = a.clone(), b.clone()
        target = x if which == "a" else y
        got = fused_matmul(x, y, target, launches=launches)
        assert got is target
        torch.testing.assert_close(got, want, rtol=2e-3, atol=0, msg=f"out=A@B written into {which}")
    base = torch.zeros(48, 24, device=DEVICE)
    base[:24] = a
    got = fused_matmul(base[:24], b, base[24:])  # another slice of A's storage
    torch.testing.assert_close(got, want, rtol=2e-3, atol=0)
    assert torch.equal(base[:24], a)


def test_spans_beyond_int32_offsets_are_measured_and_one_launch_needs_a_small_grid() -> None:
    from llamatelemetry_tensorcore.fused_matmul import FUSED_ONE_LAUNCH_MAX_PROGRAMS, one_launch

    wide = torch.empty_strided((2, 3), (2**31, 1), device="meta")  # a row stride past int32 (no memory)
    assert _fused_kernels._span(wide) == 2**31 + 2 > _fused_kernels._MAX_OFFSET
    assert _fused_kernels._span(torch.empty(4, 5)) == 19
    assert _fused_kernels._span(torch.empty(4, 5).t()) == 19
    assert one_launch(100, 100) and one_launch(100, 100, FUSED_ONE_LAUNCH_MAX_PROGRAMS)
    assert not one_launch(100, 100, FUSED_ONE_LAUNCH_MAX_PROGRAMS + 1)  # an outer product's thousands of tiles


@pytest.mark.parametrize(
    ("a_shape", "b_shape"), [((5, 7), (7, 3)), ((2, 9, 13), (13, 7)), ((3, 9, 13), (3, 13, 7)), ((40, 17), (17, 33))]
)
def test_one_launch_and_two_launches_agree_bit_for_bit(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], kernel_launches: KernelLaunches
) -> None:
    launches = kernel_launches("largest_finite_kernel").grids
    a, b = _randn(*a_shape, seed=20) * 1e7, _randn(*b_shape, seed=21) * 1e-9
    a.view(-1)[3] = float("nan")
    b_t = _randn(*b_shape[:-2], b_shape[-1], b_shape[-2], seed=22).mT  # a transposed B is dense too
    for right in (b, b_t):
        one = fused_matmul(a, right, None)  # small and dense: every program reduces A and B itself
        assert not launches
        two = fused_matmul(a, right, None, launches=2)  # a reduction launch, then the GEMM
        assert len(launches) == 1
        launches.clear()
        assert torch.equal(one.isnan(), two.isnan()) and bool(one.isnan().any())
        assert torch.equal(one.nan_to_num(), two.nan_to_num())
    strided = a[..., ::2, :]
    with pytest.raises(ConfigurationError, match="dense in memory"):
        fused_matmul(strided, b, None, launches=1)


def test_automatic_choice_and_compile_round_trip() -> None:
    a, b = _randn(6, 10, seed=10) * 1e5, _randn(10, 4, seed=11)
    with record_selections() as rec:
        eager = matmul_tensor_core(a, b)
    assert rec.last("matmul_tensor_core") == "fused"
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: matmul_tensor_core(x, y, backend="fused"), fullgraph=True, backend="eager")
    assert torch.equal(compiled(a, b), eager)
    torch.library.opcheck(_fused_op, (a, b))


def test_gradients_through_the_fused_forward() -> None:
    a = (_randn(5, 8, seed=12) * 1e5).requires_grad_()
    b = _randn(8, 3, seed=13).requires_grad_()
    with record_selections() as rec:
        matmul_tensor_core(a, b).sum().backward()  # type: ignore[no-untyped-call]
    assert "fused" in rec.implementations("matmul_tensor_core")
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, b.detach().sum(1).expand(5, 8), rtol=2e-3, atol=0)


@triton.jit  # type: ignore[untyped-decorator]
def _exponents_kernel(bits_a, bits_b, out, n, k_bits, half, quarter, eighth, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    index = tl.arange(0, BLOCK)
    mask = index < n
    e_a, e_b = _range_exponents(
        tl.load(bits_a + index, mask=mask, other=0),
        tl.load(bits_b + index, mask=mask, other=0),
        k_bits,
        half,
        quarter,
        eighth,
    )
    tl.store(out + 2 * index, e_a, mask=mask)
    tl.store(out + 2 * index + 1, e_b, mask=mask)


def _edge_maxima(rng: random.Random, count: int) -> list[float]:
    """fp32 maxima from zero through subnormals to the largest finite, weighted to powers of two and their
    neighbours (where ``ceil(log2)`` and the product comparisons turn)."""
    f32 = torch.float32
    values = [0.0, 1e-45, torch.finfo(f32).tiny, torch.finfo(f32).max, 1.0, 0.5, 2.0**-149, 2.0**127]
    while len(values) < count:
        power = torch.tensor(2.0 ** rng.randint(-149, 127), dtype=f32)
        choice = rng.random()
        if choice < 0.3:
            values.append(float(power))
        elif choice < 0.6:
            values.append(float(power.nextafter(torch.tensor(math.inf if rng.random() < 0.5 else 0.0))))
        else:
            values.append(float(torch.tensor(2.0 ** rng.uniform(-149, 127.99), dtype=f32)))
    return values


@pytest.mark.parametrize("k", [1, 2, 3, 7, 97, 1000, 4096, 11008, 2**20 + 1])
def test_kernel_exponents_equal_the_torch_arithmetic(k: int) -> None:
    rng = random.Random(k)
    maxima_a = torch.tensor(_edge_maxima(rng, 256), dtype=torch.float32)
    maxima_b = torch.tensor(_edge_maxima(rng, 256)[::-1], dtype=torch.float32)
    out = torch.empty(256, 2, dtype=torch.int32, device=DEVICE)
    k_bits, half, quarter, eighth = product_thresholds(k)
    bits_a, bits_b = (m.view(torch.int32).to(DEVICE) for m in (maxima_a, maxima_b))
    _exponents_kernel[(1,)](bits_a, bits_b, out, 256, k_bits, half, quarter, eighth, BLOCK=256)
    pairs = zip(maxima_a, maxima_b, strict=True)
    expected = torch.stack([_exponents_from_maxima(torch.stack([x, y]), k) for x, y in pairs])
    mismatch = (out.cpu().double() != expected).any(dim=1)
    assert not mismatch.any(), (
        f"first of {int(mismatch.sum())} at maxima {maxima_a[mismatch][0].item()!r}, {maxima_b[mismatch][0].item()!r}: "
        f"kernel {out.cpu()[mismatch][0].tolist()}, torch {expected[mismatch][0].tolist()}"
    )


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "splits"),
    [
        ((1, 70), (70, 5), 3),  # one row, K not a multiple of the tile depth: a short last split
        ((5, 33), (33, 7), 2),
        ((1, 97), (97, 1), 5),  # one output element
        ((3, 9, 37), (3, 37, 7), 2),  # batched
        ((2, 4, 50), (50, 6), 4),  # A's batch folded into M
        ((19, 41), (2, 41, 3), 3),  # A broadcast over B's batch (stride 0)
    ],
)
@pytest.mark.parametrize(("scale_a", "scale_b"), [(1.0, 1.0), (1e30, 1e-25), (1e-20, 1e-20)])
def test_split_k_matches_the_reference(
    check_matmul: CheckMatmul,
    kernel_launches: KernelLaunches,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    splits: int,
    scale_a: float,
    scale_b: float,
) -> None:
    split_sums = kernel_launches("split_sum_kernel")
    a, b = _randn(*a_shape, seed=sum(a_shape)) * scale_a, _randn(*b_shape, seed=sum(b_shape) + 1) * scale_b
    got = fused_matmul(a, b, None, splits=splits)
    assert len(split_sums.grids) == 1  # the product was split, then summed
    if a.dim() == 3 and b.dim() == 2:  # the same product as A's rows stacked
        _same_specification(got.reshape(-1, got.shape[-1]), a.reshape(-1, a.shape[-1]), b, check_matmul)
    else:
        _same_specification(got, a.expand(*got.shape[:-2], -1, -1) if a.dim() < b.dim() else a, b, check_matmul)
    unsplit = fused_matmul(a, b, None, splits=1)
    assert len(split_sums.grids) == 1
    torch.testing.assert_close(got, unsplit, rtol=2e-3, atol=0)  # only the order of the fp32 sums differs


def test_split_k_keeps_inf_and_nan_where_one_program_would(check_matmul: CheckMatmul) -> None:
    a, b = _randn(6, 90, seed=40) * 1e4, _randn(90, 5, seed=41).abs() + 0.5
    a[0, 2], a[0, 80] = float("inf"), float("-inf")  # in different splits: inf + -inf is NaN
    a[1, 3], a[1, 85] = float("inf"), float("inf")  # +inf in two splits stays +inf
    a[2, 50] = float("nan")
    a[3, 70] = float("-inf")
    b[60, 4] = float("nan")
    got = fused_matmul(a, b, None, splits=3)
    _same_specification(got, a, b, check_matmul)
    assert bool(got[0].isnan().all()) and bool((got[1, :4] == float("inf")).all()) and bool(got[2].isnan().all())
    assert bool(got[:, 4].isnan().all())  # B's NaN reaches its whole column
    unsplit = fused_matmul(a, b, None, splits=1)
    assert torch.equal(got.isnan(), unsplit.isnan()) and torch.equal(got[got.isinf()], unsplit[unsplit.isinf()])


def test_split_k_writes_strided_and_aliased_outputs(check_matmul: CheckMatmul) -> None:
    a, b = _randn(9, 45, seed=42) * 1e6, _randn(45, 7, seed=43)
    want = fused_matmul(a, b, None, splits=2)
    strided = torch.empty(7, 9, device=DEVICE).t()  # the split sum stores through the output's strides
    assert fused_matmul(a, b, strided, splits=2) is strided
    assert torch.equal(strided, want)
    check_matmul(strided, a, b, torch.float16)
    square_a, square_b = _randn(20, 20, seed=44) * 1e5, _randn(20, 20, seed=45)
    reference = matmul_tensor_core(square_a, square_b, backend="reference")
    x = square_a.clone()
    assert fused_matmul(x, square_b, x, splits=2) is x  # out is A: read completely before it is written
    torch.testing.assert_close(x, reference, rtol=2e-3, atol=0)


def test_split_k_arguments_and_when_it_does_not_split(kernel_launches: KernelLaunches) -> None:
    split_sums = kernel_launches("split_sum_kernel")
    reductions = kernel_launches("largest_finite_kernel")
    a, b = _randn(4, 40, seed=46), _randn(40, 3, seed=47)
    for bad in ({"splits": 0}, {"splits": 2, "launches": 1}):
        with pytest.raises(ConfigurationError, match="splits"):
            fused_matmul(a, b, None, **bad)
    assert not split_sums.grids and not reductions.grids
    fused_matmul(a, b, None)  # tiny and dense: one launch, and the interpreter never splits by itself
    assert not split_sums.grids and not reductions.grids
    fused_matmul(a, b, None, splits=2)  # a split asks for the reduction launch's partial maxima
    assert len(reductions.grids) == 1 and split_sums.grids == [(1, 1)]
    short_a, short_b = _randn(4, 16, seed=48), _randn(16, 3, seed=49)  # K within one tile step: nothing to split
    fused_matmul(short_a, short_b, None, splits=4)
    assert len(split_sums.grids) == 1
