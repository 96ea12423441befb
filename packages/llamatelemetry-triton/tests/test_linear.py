"""The few-row linear kernels (plain, with RMSNorm, with the residual add and RMSNorm, with SwiGLU in front)
against their references.

The kernel tests run where Triton executes kernels (the interpreter on CPU tensors, or a GPU); tiny shapes, with
a small forced block so that rows longer than a block and ragged last blocks are exercised. Argument checks and
the cases the kernel refuses (which then run ``F.linear``) are tested in every matrix.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import llamatelemetry_triton as lt
from llamatelemetry_core.errors import BackendUnavailableError, ConfigurationError
from llamatelemetry_core.selection import record_selections
from llamatelemetry_core.testing import assert_close
from llamatelemetry_core.testing.conformance import Conformance
from llamatelemetry_triton import HAS_TRITON, force_max_block_size
from llamatelemetry_triton._dispatch import device_info
from llamatelemetry_triton.heuristics import LINEAR_MAX_ROWS, SMALL_M_MAX_ROWS, LaunchConfig, small_m_config
from llamatelemetry_triton.ops._linear_kernel import linear_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bfloat16 runs the reference under the interpreter (NumPy has no bfloat16): its kernels are compared on GPUs.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _inputs(
    gen: torch.Generator, rows: int, n: int, k: int, dtype: torch.dtype, *, bias: bool = True
) -> dict[str, Any]:
    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

    return {
        "x": randn(rows, k),
        "residual": randn(rows, k),
        "norm_weight": (torch.rand(k, generator=gen) + 0.5).to(dtype).to(DEVICE),
        "weight": randn(n, k, scale=k**-0.5),
        "bias": randn(n) if bias else None,
    }


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", range(1, LINEAR_MAX_ROWS + 1))
def test_every_row_count_matches_the_reference(rows: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows)
    a = _inputs(gen, rows, 37, 45, dtype)  # K = 45: two full blocks of 16 and a ragged one
    x, r, nw, w, b = a["x"], a["residual"], a["norm_weight"], a["weight"], a["bias"]
    with force_max_block_size(16), record_selections() as rec:
        y = lt.triton_linear(x, w, b)
        y_norm = lt.triton_rmsnorm_linear(x, nw, w, b)
        y_fused, h = lt.triton_fused_add_rmsnorm_linear(x, r, nw, w, b)
    for name in ("linear", "rmsnorm_linear", "fused_add_rmsnorm_linear"):
        assert rec.implementations(f"triton.{name}") == ["triton"], rec.selections
    assert_close(y, F.linear(x, w, b), name="linear", dtype=dtype)
    assert_close(y_norm, lt.rmsnorm_linear_reference(x, nw, w, b), name="rmsnorm + linear", dtype=dtype)
    want_y, want_h = lt.fused_add_rmsnorm_linear_reference(x, r, nw, w, b)
    assert torch.equal(h, want_h), "h is x + residual rounded once, written whole"
    assert_close(y_fused, want_y, name="add + rmsnorm + linear", dtype=dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k", "bias"), [(1, 1, True), (5, 16, False), (33, 17, True), (70, 64, False)])
def test_awkward_shapes_match_the_unfused_composition(n: int, k: int, bias: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n * 100 + k)
    a = _inputs(gen, 3, n, k, dtype, bias=bias)
    x, r, nw, w, b = a["x"], a["residual"], a["norm_weight"], a["weight"], a["bias"]
    with force_max_block_size(16):
        y, h = lt.triton_fused_add_rmsnorm_linear(x, r, nw, w, b, eps=1e-5)
        normed, want_h = lt.triton_fused_add_rmsnorm(x, r, nw, eps=1e-5)
    assert y.shape == (3, n) and y.dtype == dtype
    assert torch.equal(h, want_h)
    assert_close(y, F.linear(normed, w, b), name="fused vs fused norm then F.linear", dtype=dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "n", "bias"), [(1, 19, True), (3, 8, False), (8, 21, True)])
def test_the_swiglu_epilogue_matches_projection_then_swiglu(rows: int, n: int, bias: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(rows * 7 + n)
    a = _inputs(gen, rows, 2 * n, 45, dtype, bias=bias)  # a merged [2N, K] gate/up weight, gate rows first
    x, r, nw, w, b = a["x"], a["residual"], a["norm_weight"], a["weight"], a["bias"]
    with force_max_block_size(16), record_selections() as rec:
        y = lt.triton_linear(x, w, b, swiglu=True)
        y_first = lt.triton_rmsnorm_linear(x, nw, w, b, swiglu=True)
        y_fused, h = lt.triton_fused_add_rmsnorm_linear(x, r, nw, w, b, swiglu=True)
        normed, want_h = lt.triton_fused_add_rmsnorm(x, r, nw)
        unfused = lt.triton_swiglu(F.linear(normed, w, b))  # what the engine runs: three launches
    assert rec.implementations("triton.fused_add_rmsnorm_linear") == ["triton"]
    assert y.shape == (rows, n) and torch.equal(h, want_h)
    assert_close(y, lt.swiglu_reference(*F.linear(x, w, b).chunk(2, -1)), name="linear + swiglu", dtype=dtype)
    assert_close(y_first, lt.rmsnorm_linear_reference(x, nw, w, b, swiglu=True), name="first norm", dtype=dtype)
    assert_close(y_fused, unfused, name="fused add + norm + gate/up + swiglu", dtype=dtype)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "n", "k", "bias"), [(1, 19, 45, True), (2, 8, 32, False), (8, 21, 37, True)])
def test_the_swiglu_prologue_matches_swiglu_then_projection(
    rows: int, n: int, k: int, bias: bool, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(rows * 11 + n + k)
    a = _inputs(gen, rows, n, k, dtype, bias=bias)
    gate_up = (torch.randn(rows, 2 * k, generator=gen) * 2).to(dtype).to(DEVICE)  # [gate | up], as a merged projection
    w, b = a["weight"], a["bias"]
    with force_max_block_size(16), record_selections() as rec:
        y = lt.triton_swiglu_linear(gate_up, w, b)
        unfused = F.linear(lt.triton_swiglu(gate_up), w, b)  # what an MLP runs unfused: two launches
    assert rec.implementations("triton.swiglu_linear") == ["triton"]
    assert y.shape == (rows, n) and y.dtype == dtype
    assert_close(y, lt.swiglu_linear_reference(gate_up, w, b), name="swiglu + linear", dtype=dtype)
    assert_close(y, unfused, name="swiglu kernel, then F.linear", dtype=dtype)
    # Leading dimensions and gate/up rows that are a strided view (every other row of a wider buffer).
    wide = torch.zeros(rows, 2, 2 * k, dtype=dtype, device=DEVICE)
    wide[:, 0] = gate_up
    with force_max_block_size(16):
        y_view = lt.triton_swiglu_linear(wide[:, 0].unsqueeze(0), w, b)
    assert y_view.shape == (1, rows, n) and torch.equal(y_view[0], y)


def _small_m_expected(rows: int, n: int, k: int, swiglu: bool, dtype: torch.dtype) -> str:
    """The implementation a small-M call selects here: the kernel where a launch is measured, else F.linear."""
    config = small_m_config(rows, n, k, swiglu, dtype, device_info(torch.device(DEVICE)))
    return "triton" if HAS_TRITON and config is not None else "reference"


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []), ids=str)
@pytest.mark.parametrize(
    ("rows", "n", "k", "bias", "swiglu"),
    [(9, 40, 96, False, False), (33, 24, 200, True, False), (64, 48, 64, True, True), (17, 19, 150, False, True),
     (64, 70, 700, True, False)],
)  # fmt: skip
def test_small_m_rows_match_the_reference(
    rows: int, n: int, k: int, bias: bool, swiglu: bool, dtype: torch.dtype
) -> None:
    # Past LINEAR_MAX_ROWS rows the Tensor Core kernel takes plain and SwiGLU-epilogue calls (where measured); a
    # ragged K (200, 150) and N (19, 70), and a long K (700 >= 4N: the split launch), against F.linear.
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    inp = _inputs(gen, rows, 2 * n if swiglu else n, k, dtype, bias=bias)
    x, w, b = inp["x"], inp["weight"], inp["bias"]
    with record_selections() as rec:
        y = lt.triton_linear(x, w, b, swiglu=swiglu)
    assert rec.implementations("triton.linear") == [_small_m_expected(rows, n, k, swiglu, dtype)]
    full = F.linear(x.float(), w.float(), None if b is None else b.float()).to(dtype)
    if swiglu:
        gate, up = full.float().chunk(2, dim=-1)
        full = (F.silu(gate) * up).to(dtype)
    assert y.shape == (rows, n) and y.dtype == dtype
    assert_close(y, full, name="small-M linear", dtype=dtype)
    assert torch.equal(lt.triton_linear(x, w, b, swiglu=swiglu), y)  # the same bits again


@pytest.mark.triton
@pytest.mark.parametrize("splits", [2, 3, 5])
def test_small_m_split_k_sums_the_partials_in_order(splits: int) -> None:
    # Each split writes an fp32 partial; the last program of a column block to count itself in sums them all in
    # split order: a count that never reached the last split, or a sum that missed a partial, fails the comparison
    # with F.linear. K = 150 leaves the last split short (two splits of 96 elements, three of 64, five of 32:
    # BLOCK_K multiples, never an empty one). The interpreter runs programs one after another, so whichever order
    # they finish in on a GPU is checked there (the model-size test replays a split launch from a CUDA graph).
    gen = torch.Generator().manual_seed(splits)
    inp = _inputs(gen, 12, 37, 150, torch.float16)
    x, w, b = inp["x"], inp["weight"], inp["bias"]
    config = LaunchConfig(16, 4, 1, splits=splits, chunk_size=32)
    first, _ = linear_forward(x, None, None, w, b, 0.0, config=config)
    again, _ = linear_forward(x, None, None, w, b, 0.0, config=config)
    assert torch.equal(first, again)
    assert_close(first, F.linear(x.float(), w.float(), b.float()).half(), name="split-K linear", dtype=torch.float16)


@pytest.mark.triton
def test_split_k_launches_leave_their_counts_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    # The last split of each column block sets its count back to zero, so launches in order share one buffer of
    # counts with no fill between them (on a GPU, per stream or per captured graph; the interpreter gets fresh
    # zeros, so the buffer is shared here by hand). Launches of 2, 3 and 5 splits over 3 and 2 column blocks, one
    # after another on one buffer: a count left behind would make the next launch's last split sum too early (or
    # never), and the comparison with F.linear fails.
    from llamatelemetry_triton.ops import _linear_kernel

    shared = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(_linear_kernel, "split_counters", lambda device, blocks: shared)
    gen = torch.Generator().manual_seed(7)
    for splits, n in ((2, 37), (3, 20), (5, 37), (2, 37)):
        inp = _inputs(gen, 12, n, 150, torch.float16)
        x, w, b = inp["x"], inp["weight"], inp["bias"]
        y, _ = linear_forward(x, None, None, w, b, 0.0, config=LaunchConfig(16, 4, 1, splits=splits, chunk_size=32))
        assert_close(y, F.linear(x.float(), w.float(), b.float()).half(), name="split-K linear", dtype=torch.float16)
        assert not shared.any(), f"counts left after a launch of {splits} splits: {shared.tolist()}"


@pytest.mark.triton
@pytest.mark.parametrize(("rows", "k", "programs", "block_n"), [(1, 45, 3, 4), (3, 64, 3, 4), (2, 64, 9, 2)])
def test_persistent_programs_cover_every_column_block(rows: int, k: int, programs: int, block_n: int) -> None:
    # Fewer programs than column blocks: each program reads (and normalizes) its input rows once, then walks
    # blocks p, p + G, ... loading each block's weight while multiplying the one before. The plain and fused forms
    # have 74 output columns, the down projection 37 and the SwiGLU epilogue 37 in blocks of block_n / 2 (one or
    # two gate rows with their up rows): 10 to 37 blocks, the last ragged, over 3 or 9 programs. Every form against
    # its reference, ragged K (45) and whole (64).
    assert programs < -(-37 // block_n)  # persistent in every form: fewer programs than blocks
    gen = torch.Generator().manual_seed(rows * 100 + k + programs)
    a = _inputs(gen, rows, 74, k, torch.float16)  # 74 rows: a plain [74, K] weight or a [2 x 37, K] gate/up one
    x, r, nw, w, b = a["x"], a["residual"], a["norm_weight"], a["weight"], a["bias"]
    assert b is not None
    gate_up = (torch.randn(rows, 2 * k, generator=gen) * 2).half().to(DEVICE)
    config = LaunchConfig(block_n, 4, 1, chunk_size=64, programs=programs)
    y, _ = linear_forward(x, None, None, w, b, 0.0, config=config)
    assert_close(y, F.linear(x, w, b), name="linear", dtype=torch.float16)
    y_fused, h = linear_forward(x, r, nw, w, b, 1e-5, config=config)
    want_y, want_h = lt.fused_add_rmsnorm_linear_reference(x, r, nw, w, b, eps=1e-5)
    assert h is not None and torch.equal(h, want_h)
    assert_close(y_fused, want_y, name="add + rmsnorm + linear", dtype=torch.float16)
    y_glu, _ = linear_forward(x, r, nw, w, b, 1e-5, swiglu=True, config=config)
    want_glu, _ = lt.fused_add_rmsnorm_linear_reference(x, r, nw, w, b, eps=1e-5, swiglu=True)
    assert_close(y_glu, want_glu, name="add + rmsnorm + gate/up + swiglu", dtype=torch.float16)
    down, down_b = w[:37], b[:37]
    y_down, _ = linear_forward(gate_up, None, None, down, down_b, 0.0, config=config, glu_input=True)
    want_down = lt.swiglu_linear_reference(gate_up, down, down_b)
    assert_close(y_down, want_down, name="swiglu + linear", dtype=torch.float16)


@pytest.mark.triton
def test_a_persistent_launch_needs_k_in_one_block() -> None:
    x, w = torch.randn(1, 100), torch.randn(40, 100)
    with pytest.raises(ConfigurationError, match=r"BLOCK_K \(chunk_size\) >= K = 100, got 64"):
        linear_forward(x, None, None, w, None, 0.0, config=LaunchConfig(4, 4, 1, chunk_size=64, programs=3))


def test_small_m_configs_only_where_measured() -> None:
    from llamatelemetry_core.device import DeviceInfo, simulate_device

    def device(key: str) -> DeviceInfo:
        with simulate_device(key) as info:
            return info

    hopper = small_m_config(64, 2048, 8192, False, torch.float16, device("h200"))
    assert hopper is not None and hopper.splits == 2 and hopper.block_size == 32  # the down projection's launch
    gate_up = small_m_config(64, 8192, 2048, True, torch.bfloat16, device("h100"))
    assert gate_up is not None and gate_up.splits == 1 and gate_up.block_size == 64
    for key in ("t4", "a100", "l4", "rtx4090", "b200"):  # unmeasured there: F.linear (cuBLAS) runs
        assert small_m_config(64, 2048, 2048, False, torch.float16, device(key)) is None, key
    assert small_m_config(64, 2048, 2048, False, torch.float32, device("h200")) is None  # no TF32 behind fp32
    assert small_m_config(64, 2048, 2048, False, torch.bfloat16, device("cpu")) is None  # the interpreter's bf16
    assert small_m_config(64, 2048, 2048, False, torch.float16, device("cpu")) is not None


@pytest.mark.triton
def test_strided_rows_leading_dims_and_a_padded_weight() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 40, generator=gen).to(DEVICE)[..., 3:35]  # [2, 3, 32], rows at stride 40
    r = torch.randn(2, 3, 32, generator=gen).to(DEVICE)
    padded = torch.randn(19, 48, generator=gen).to(DEVICE)
    w = padded[:, :32]  # rows of 32 at stride 48: contiguous rows, padded
    nw = torch.rand(32, generator=gen).to(DEVICE)
    with force_max_block_size(16), record_selections() as rec:
        y = lt.triton_linear(x, w)
        y_fused, h = lt.triton_fused_add_rmsnorm_linear(x, r, nw, w)
    assert rec.implementations("triton.linear") == ["triton"]
    assert y.shape == (2, 3, 19) and h.shape == (2, 3, 32)
    assert_close(y, F.linear(x, w), name="strided linear", dtype=torch.float32)
    want_y, want_h = lt.fused_add_rmsnorm_linear_reference(x, r, nw, w)
    assert_close(y_fused, want_y, name="strided fused", dtype=torch.float32)
    assert torch.equal(h, want_h)


@pytest.mark.triton
def test_mixed_residual_dtype_keeps_the_promoted_stream() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 24, generator=gen).half().to(DEVICE)
    r = torch.randn(2, 24, generator=gen).to(DEVICE)  # fp32 residual stream, fp16 activations
    w = (torch.randn(10, 24, generator=gen) * 0.2).half().to(DEVICE)
    nw = torch.rand(24, generator=gen).to(DEVICE)
    with force_max_block_size(16):
        y, h = lt.triton_fused_add_rmsnorm_linear(x, r, nw, w)
    want_y, want_h = lt.fused_add_rmsnorm_linear_reference(x, r, nw, w)
    assert h.dtype == torch.float32 and y.dtype == torch.float16
    assert torch.equal(h, want_h)
    assert_close(y, want_y, name="mixed residual", dtype=torch.float16)


@pytest.mark.triton
def test_registry_launch_is_bounds_checked() -> None:
    kernel = lt.get_kernel("linear")
    x, w, y = torch.randn(2, 32), torch.randn(8, 32), torch.empty(2, 8)
    x, w, y = x.to(DEVICE), w.to(DEVICE), y.to(DEVICE)
    args = (x, x, x, w, w, y, y, 2, 8, 32, 32, 32, 32, 1e-6)
    kernel.launch(*args, grid=(2,), BLOCK_M=2, BLOCK_N=4, BLOCK_K=16, EVEN_K=True)
    assert_close(y, F.linear(x, w), name="registry linear", dtype=torch.float32)
    with pytest.raises(ConfigurationError, match="reaches 320 elements of W"):
        kernel.launch(*args[:8], 10, *args[9:], grid=(3,), BLOCK_M=2, BLOCK_N=4, BLOCK_K=16)
    # The SwiGLU prologue reads [gate | up] rows twice K wide, and takes no norm, residual or epilogue with it.
    with pytest.raises(ConfigurationError, match="reaches"):
        kernel.launch(*args, grid=(2,), BLOCK_M=2, BLOCK_N=4, BLOCK_K=16, EVEN_K=True, GLU_IN=True)
    with pytest.raises(ConfigurationError, match=r"GLU_IN \(a \[gate \| up\] input\) cannot be combined with NORM"):
        kernel.launch(*args, grid=(2,), BLOCK_M=2, BLOCK_N=4, BLOCK_K=16, EVEN_K=True, GLU_IN=True, NORM=True)
    gate_up = torch.randn(2, 64).to(DEVICE)
    kernel.launch(gate_up, *args[1:10], 64, *args[11:], grid=(2,), BLOCK_M=2, BLOCK_N=4, BLOCK_K=16, EVEN_K=True,
                  GLU_IN=True)  # fmt: skip
    assert_close(y, lt.swiglu_linear_reference(gate_up, w), name="registry swiglu + linear", dtype=torch.float32)
    # A persistent launch: one program walks both column blocks; K must fit one BLOCK_K (the rows are held whole).
    y.zero_()
    kernel.launch(*args, grid=(1,), BLOCK_M=2, BLOCK_N=4, BLOCK_K=32, EVEN_K=True, PERSISTENT=True)
    assert_close(y, F.linear(x, w), name="registry persistent linear", dtype=torch.float32)
    with pytest.raises(ConfigurationError, match=r"expected BLOCK_K >= K = 32, got BLOCK_K=16"):
        kernel.launch(*args, grid=(1,), BLOCK_M=2, BLOCK_N=4, BLOCK_K=16, EVEN_K=True, PERSISTENT=True)
    # Flags the kernel would obey into a wrong result: no column mask on a ragged K, h never written.
    with pytest.raises(ConfigurationError, match=r"K = 32 to be a multiple of BLOCK_K = 64"):
        kernel.launch(*args, grid=(1,), BLOCK_M=2, BLOCK_N=4, BLOCK_K=64, EVEN_K=True, PERSISTENT=True)
    with pytest.raises(ConfigurationError, match=r"HAS_RESIDUAL .* comes with the norm"):
        kernel.launch(*args, grid=(2,), BLOCK_M=2, BLOCK_N=4, BLOCK_K=16, HAS_RESIDUAL=True)


# --- refusals and argument checks (every matrix) ----------------------------------------------------------


def _small(rows: int = 2, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows)
    return torch.randn(rows, 16, generator=gen).to(dtype), torch.randn(6, 16, generator=gen).to(dtype)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: (*_small(LINEAR_MAX_ROWS + 1), None), f"at most {LINEAR_MAX_ROWS}"),
        (lambda: (*_small(SMALL_M_MAX_ROWS + 1, torch.float16), None), f"at most {SMALL_M_MAX_ROWS}"),
        (lambda: (_small()[0], torch.randn(16, 6).t(), None), "rows are not contiguous"),
        (lambda: (_small()[0].requires_grad_(), _small()[1], None), "no backward"),
    ],
    ids=["too_many_rows", "past_the_small_m_kernel", "column_major_weight", "needs_grad"],
)
def test_refused_calls_run_f_linear_and_say_why(make: Any, reason: str) -> None:
    x, w, b = make()
    x, w = x.to(DEVICE), w.to(DEVICE)  # .to keeps the transposed weight's strides
    with record_selections() as rec:
        y = lt.triton_linear(x, w, b)
    assert rec.implementations("triton.linear") == ["reference"]
    assert_close(y.detach(), F.linear(x, w, b).detach(), name="refused linear", dtype=torch.float32)
    if HAS_TRITON:
        with pytest.raises(BackendUnavailableError, match=reason):
            lt.triton_linear(x, w, b, backend="triton")


def test_the_fused_reference_is_the_unfused_composition() -> None:
    gen = torch.Generator().manual_seed(9)
    a = _inputs(gen, 12, 7, 20, torch.float32)  # 12 rows: refused, the reference runs
    x, r, nw, w, b = a["x"], a["residual"], a["norm_weight"], a["weight"], a["bias"]
    y, h = lt.triton_fused_add_rmsnorm_linear(x, r, nw, w, b)
    normed, want_h = lt.fused_add_rmsnorm_reference(x, r, nw)
    assert torch.equal(h, want_h) and torch.equal(y, F.linear(normed, w, b))
    assert torch.equal(lt.triton_rmsnorm_linear(x, nw, w), F.linear(lt.rmsnorm_reference(x, nw), w))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, w: lt.triton_linear(x, w[:, :8]), r"expected weight of shape \[N, 16\]"),
        (lambda x, w: lt.triton_linear(x, w.half()), "expected weight in x's dtype float32"),
        (lambda x, w: lt.triton_linear(x, w, torch.zeros(5)), r"expected bias of shape \[6\]"),
        (lambda x, w: lt.triton_linear(x, w, torch.zeros(6).half()), "expected bias in x's dtype"),
        (lambda x, w: lt.triton_rmsnorm_linear(x, torch.ones(15), w), r"expected norm_weight of shape \[16\]"),
        (lambda x, w: lt.triton_rmsnorm_linear(x, torch.ones(16), w, eps=-1.0), "eps to be a number >= 0"),
        (lambda x, w: lt.triton_fused_add_rmsnorm_linear(x, x[:1], torch.ones(16), w), "expected residual of x's"),
        (lambda x, w: lt.triton_linear(x.long(), w), "floating-point tensor"),
        (lambda x, w: lt.triton_linear(x, w[:5], swiglu=True), "merged .2N, K. gate/up weight"),
        (lambda x, w: lt.triton_linear(x[0, 0], w), "0-d tensor"),
        (lambda x, w: lt.triton_swiglu_linear(x, w), r"expected gate_up of shape \[\.\.\., 2K\]"),
        (lambda x, w: lt.triton_swiglu_linear(x[..., :16].repeat(1, 1, 2), w.half()), "expected weight in x's dtype"),
        (lambda x, w: lt.triton_swiglu_linear(x.repeat(1, 1, 2), w, torch.zeros(5)), r"expected bias of shape \[6\]"),
        (lambda x, w: lt.triton_swiglu_linear(x[0, 0], w), "0-d tensor"),
    ],
)
def test_bad_arguments_raise_actionable_errors(call: Any, match: str) -> None:
    x, w = _small()
    with pytest.raises(ConfigurationError, match=match):
        call(x, w)


def test_residual_none_is_an_error_for_the_fused_form() -> None:
    x, w = _small()
    with pytest.raises(TypeError, match="residual"):
        lt.triton_fused_add_rmsnorm_linear(x, None, torch.ones(16), w)  # type: ignore[arg-type]


def test_empty_inputs_give_empty_or_bias_outputs() -> None:
    x, w = torch.randn(0, 16), torch.randn(6, 16)
    assert lt.triton_linear(x, w).shape == (0, 6)
    assert lt.triton_swiglu_linear(torch.randn(0, 32), w).shape == (0, 6)
    b = torch.randn(3)
    assert torch.equal(lt.triton_linear(torch.randn(2, 0), torch.randn(3, 0), b), b.expand(2, 3))


# --- the custom ops (torch.compile, CUDA graphs) ----------------------------------------------------------


@pytest.mark.triton
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck_of_the_custom_ops(residual: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    a = _inputs(gen, 3, 9, 20, torch.float32)
    for swiglu in (False, True):
        Conformance.check_opcheck(
            torch.ops.llamatelemetry.triton_linear.default, (a["x"], a["weight"], a["bias"], swiglu)
        )
        Conformance.check_opcheck(
            torch.ops.llamatelemetry.triton_rmsnorm_linear.default,
            (a["x"], a["residual"] if residual else None, a["norm_weight"], a["weight"], a["bias"], 1e-6, swiglu),
        )
    gate_up = torch.randn(3, 40, generator=gen).to(DEVICE)
    Conformance.check_opcheck(
        torch.ops.llamatelemetry.triton_swiglu_linear.default, (gate_up, a["weight"], a["bias"] if residual else None)
    )


# --- on a GPU: model sizes, every dtype, CUDA graphs, torch.compile ------------------------------------------

GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _linear64(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` in float64, rounded to ``x``'s dtype: at K = 8192 two fp32 summation orders (cuBLAS's and the
    kernel's) can differ by more than the fp32 tolerance, while each is well within it of the exact sum."""
    return F.linear(x.double(), w.double(), None if b is None else b.double()).to(x.dtype)


def _skip_unsupported(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("bfloat16 needs compute capability >= 8.0")


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize(("n", "k"), [(3072, 2048), (2048, 8192), (16384, 2048), (1001, 1000)])
def test_model_sizes_on_the_gpu(n: int, k: int, rows: int, dtype: torch.dtype) -> None:
    _skip_unsupported(dtype)
    gen = torch.Generator().manual_seed(n + k + rows)
    a = _inputs(gen, rows, n, k, dtype, bias=n % 2 == 1)
    x, r, nw, w, b = a["x"], a["residual"], a["norm_weight"], a["weight"], a["bias"]
    with record_selections() as rec:
        y = lt.triton_linear(x, w, b)
        y_fused, h = lt.triton_fused_add_rmsnorm_linear(x, r, nw, w, b)
        y_first = lt.triton_rmsnorm_linear(x, nw, w, b)
    assert set(rec.implementations("triton.linear") + rec.implementations("triton.rmsnorm_linear")) == {"triton"}
    assert rec.implementations("triton.fused_add_rmsnorm_linear") == ["triton"]
    assert_close(y, _linear64(x, w, b), name="linear", dtype=dtype)
    normed, want_h = lt.triton_fused_add_rmsnorm(x, r, nw)
    assert torch.equal(h, want_h)
    assert_close(y_fused, _linear64(normed, w, b), name="fused vs fused norm + F.linear", dtype=dtype)
    assert_close(y_first, _linear64(lt.triton_rmsnorm(x, nw), w, b), name="rmsnorm + linear", dtype=dtype)
    if n % 2 == 0:  # a merged gate/up weight: the SwiGLU epilogue against norm, projection, SwiGLU kernel
        y_glu, _ = lt.triton_fused_add_rmsnorm_linear(x, r, nw, w, b, swiglu=True)
        assert_close(y_glu, lt.triton_swiglu(_linear64(normed, w, b)), name="swiglu epilogue", dtype=dtype)
    # The SwiGLU prologue: this weight as a down projection of a [gate | up] input twice its K.
    gate_up = (torch.randn(rows, 2 * k, generator=gen) * 2).to(dtype).to(DEVICE)
    with record_selections() as rec:
        y_down = lt.triton_swiglu_linear(gate_up, w, b)
    assert rec.implementations("triton.swiglu_linear") == ["triton"]
    assert_close(y_down, _linear64(lt.triton_swiglu(gate_up), w, b), name="swiglu prologue", dtype=dtype)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@pytest.mark.parametrize("rows", [9, 40, 64])
@pytest.mark.parametrize(("n", "k"), [(3072, 2048), (2048, 8192), (16384, 2048), (1001, 1000)])
def test_small_m_model_sizes_on_the_gpu(n: int, k: int, rows: int, dtype: torch.dtype) -> None:
    # Past LINEAR_MAX_ROWS: the small-M kernel on Hopper in fp16/bf16 (q/k/v, the split down projection, gate/up
    # with the SwiGLU epilogue, a ragged shape), F.linear elsewhere; both against float64, and replayed from a
    # CUDA graph (its own counts, zero-filled at the start of each replay) to the same bits.
    _skip_unsupported(dtype)
    gen = torch.Generator().manual_seed(n + k + rows)
    a = _inputs(gen, rows, n, k, dtype, bias=n % 2 == 1)
    x, w, b = a["x"], a["weight"], a["bias"]
    with record_selections() as rec:
        y = lt.triton_linear(x, w, b)
    assert rec.implementations("triton.linear") == [_small_m_expected(rows, n, k, False, dtype)]
    assert_close(y, _linear64(x, w, b), name="small-M linear", dtype=dtype)
    if n % 2 == 0:  # a merged gate/up weight: the SwiGLU epilogue against the projection, then the SwiGLU kernel
        y_glu = lt.triton_linear(x, w, b, swiglu=True)
        assert_close(y_glu, lt.triton_swiglu(_linear64(x, w, b)), name="small-M swiglu epilogue", dtype=dtype)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lt.triton_linear(x, w, b)
    for _ in range(2):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, y)


@pytest.mark.gpu
@pytest.mark.triton
def test_split_counts_are_kept_per_stream_and_per_captured_graph() -> None:
    # The down projection's split launch (64 x 8192 -> 2048 on Hopper): eager launches on one stream reuse that
    # stream's counts; two graphs captured through llamatelemetry-graphs (which names its graph to core on every
    # torch) get a buffer each, so the two may replay at once on two streams, and the buffers go with the graphs.
    # A plain torch.cuda.graph capture gets its own buffer where torch can name the graph, else fresh zeros per
    # launch. Every result equals the first eager one, bit for bit.
    from llamatelemetry_graphs import CUDAGraph
    from llamatelemetry_triton.ops import _linear_kernel

    if small_m_config(64, 2048, 8192, False, torch.float16, device_info(torch.device("cuda"))) is None:
        pytest.skip("the small-M kernel runs on Hopper only")
    gen = torch.Generator().manual_seed(3)
    a = _inputs(gen, 64, 2048, 8192, torch.float16, bias=False)
    x, w = a["x"], a["weight"]
    want = lt.triton_linear(x, w)
    assert torch.equal(lt.triton_linear(x, w), want)
    counts = _linear_kernel.split_counters(x.device, 1)
    assert counts is _linear_kernel.split_counters(x.device, 1)  # this stream's buffer, kept
    torch.cuda.synchronize()
    assert not counts.any()
    before = len(_linear_kernel._GRAPH_COUNTERS)
    graphs = [CUDAGraph(), CUDAGraph()]
    for graph in graphs:
        graph.capture(lambda: lt.triton_linear(x, w))
    assert len(_linear_kernel._GRAPH_COUNTERS) == before + 2
    plain = torch.cuda.CUDAGraph()
    with torch.cuda.graph(plain):
        plain_out = lt.triton_linear(x, w)
    streams = [torch.cuda.Stream() for _ in graphs]  # type: ignore[no-untyped-call]
    for _ in range(3):
        outs = []
        for graph, stream in zip(graphs, streams, strict=True):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                outs.append(graph.replay().clone())
        plain_out.zero_()
        plain.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(out, want) for out in outs) and torch.equal(plain_out, want)
    del graphs, graph, plain
    gc.collect()
    assert len(_linear_kernel._GRAPH_COUNTERS) == before


@pytest.mark.gpu
@pytest.mark.triton
def test_a_decode_block_is_captured_in_a_cuda_graph_and_compiles() -> None:
    gen = torch.Generator().manual_seed(0)
    a = _inputs(gen, 2, 3072, 2048, torch.float16, bias=False)
    x, r, nw, w = a["x"], a["residual"], a["norm_weight"], a["weight"]
    o = _inputs(gen, 2, 2048, 3072, torch.float16)["weight"]

    def block(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        qkv, h = lt.triton_fused_add_rmsnorm_linear(x, r, nw, w)
        return lt.triton_linear(qkv, o), h

    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and warm up outside the capture
            block(x, r)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, h = block(x, r)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    want_qkv, want_h = lt.fused_add_rmsnorm_linear_reference(x, r, nw, w)
    assert torch.equal(h, want_h)
    assert_close(out, F.linear(want_qkv, o), name="captured block", dtype=torch.float16)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    got, got_h = compiled(x, r)
    assert torch.equal(got_h, want_h)
    assert_close(got, F.linear(want_qkv, o), name="compiled block", dtype=torch.float16)
