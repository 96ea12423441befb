"""When the fused path is chosen, why it is refused, and its launch heuristics (no kernel runs: simulated GPUs)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamatelemetry_core import simulate_device
from llamatelemetry_core.selection import CallSpec, NoticeReason, QuietReason
from llamatelemetry_core.toolchain import TRITON_INSTALL
from llamatelemetry_tensorcore.fused_matmul import (
    FUSED_MATMUL_MAX_MNK,
    SPLIT_K_MAX_SPLITS,
    SPLIT_K_MIN_CHUNK,
    SPLIT_K_PROGRAMS_PER_SM,
    fused_scope_reason,
    fused_tiles,
    kernel_builds,
    largest_finite_programs,
    split_chunks,
    split_k,
)
from llamatelemetry_tensorcore.matmul import MATMUL_OPERATION, MatmulCall

HAS_TRITON = importlib.util.find_spec("triton") is not None
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _reasons(
    key: str,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    a_dtype: torch.dtype = F32,
    b_dtype: torch.dtype = F32,
    dtype: torch.dtype = F16,
) -> dict[str, str | None]:
    with simulate_device(key) as info:
        call = CallSpec(device=info, dtype=dtype, shapes=(a_shape, b_shape), facts=MatmulCall(a_dtype, b_dtype))
        return {c.name: c.reason for c in MATMUL_OPERATION.explain(call)}


def _chosen(key: str, *args: object) -> str:
    reasons = _reasons(key, *args)  # type: ignore[arg-type]
    return next(name for name, reason in reasons.items() if reason is None)


@pytest.mark.skipif(not HAS_TRITON, reason="the fused path needs Triton (the cpu-fallback matrix has none)")
@pytest.mark.parametrize("key", ["t4", "a100", "h100"])
@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [((1024, 1024), (1024, 1024)), ((1, 4096), (4096, 4096)), ((4, 77, 300), (300, 50)), ((3, 9, 5), (3, 5, 7))],
)
def test_small_fp32_products_choose_the_fused_path(
    key: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> None:
    assert _chosen(key, a_shape, b_shape) == "fused"
    assert _chosen(key, a_shape, b_shape, F16, F32) == "fused"  # one fp16 input: the other still needs scaling


@pytest.mark.parametrize(
    ("key", "a_shape", "b_shape", "a_dtype", "b_dtype", "dtype", "reason"),
    [
        ("h100", (8192, 8192), (8192, 8192), F32, F32, F16, "cuBLAS is faster above"),
        ("h100", (64, 64), (64, 64), F16, F16, F16, "float16 inputs need no range scaling"),
        ("h100", (64, 64), (64, 64), F32, F32, BF16, "bfloat16 needs no scaling"),
        ("h100", (64, 64), (64, 64), torch.float64, F32, F16, "not float64"),
        ("t4", (64, 64), (64, 64), BF16, F32, F16, "bfloat16 inputs on GPUs with bfloat16"),
        ("h100", (2, 3, 64, 64), (2, 3, 64, 64), F32, F32, F16, "one batch dimension"),
        ("h100", (0, 64), (64, 64), F32, F32, F16, "empty product"),
        ("h100", (64, 0), (0, 64), F32, F32, F16, "empty product"),
        ("h100", (1, 2**30 + 1), (2**30 + 1, 1), F32, F32, F16, "2^30 elements"),
        ("h100", (70000, 2, 2), (70000, 2, 2), F32, F32, F16, "65535 batches"),
        ("v100", (64, 64), (64, 64), F32, F32, F16, "compute capability >= 7.5"),
    ],
)
def test_refusals_say_why_and_are_not_warnings(
    key: str,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    a_dtype: torch.dtype,
    b_dtype: torch.dtype,
    dtype: torch.dtype,
    reason: str,
) -> None:
    if reason.startswith("compute capability") and not HAS_TRITON:
        pytest.skip("without Triton the module gate answers first")
    got = _reasons(key, a_shape, b_shape, a_dtype, b_dtype, dtype)["fused"]
    assert got is not None and reason in got
    assert not isinstance(got, NoticeReason)  # the library's choice, never announced


def test_the_threshold_is_inclusive_and_counts_the_batch() -> None:
    m, k, n = 2048, 4096, 11008  # the measured crossover: the constant's own product
    assert m * k * n == FUSED_MATMUL_MAX_MNK
    at = _reasons("h100", (m, k), (k, n))["fused"]
    above = _reasons("h100", (2, m, k), (2, k, n))["fused"]
    just_above = _reasons("h100", (m + 1, k), (k, n))["fused"]
    assert just_above is not None and "cuBLAS is faster above" in just_above
    assert above is not None and "cuBLAS is faster above" in above
    assert at is None or isinstance(at, NoticeReason)  # None with Triton, the install notice without


@pytest.mark.no_triton
def test_without_triton_an_in_scope_call_notices_the_missing_package() -> None:
    reason = _reasons("h100", (64, 64), (64, 64))["fused"]
    assert isinstance(reason, NoticeReason) and TRITON_INSTALL in reason
    out_of_scope = _reasons("h100", (64, 64), (64, 64), F16, F16)["fused"]
    assert out_of_scope is not None and not isinstance(out_of_scope, NoticeReason)  # the gate ends the list first


def test_the_interpreter_takes_small_products_only() -> None:
    small = _reasons("cpu", (64, 64), (64, 64))["fused"]
    assert small is None or "runs on cuda" in small  # chosen where the interpreter is on
    large = _reasons("cpu", (64, 65), (65, 64))["fused"]
    assert large is not None and ("the interpreter is slower above" in large or "runs on cuda" in large)


def test_bf16_on_the_interpreter_is_a_quiet_refusal() -> None:
    with simulate_device("cpu") as cpu:
        call = CallSpec(device=cpu, dtype=F16, shapes=((4, 4), (4, 4)), facts=MatmulCall(BF16, F32))
    assert isinstance(fused_scope_reason(call), QuietReason)  # NumPy cannot round to bf16: the reference runs


@pytest.mark.parametrize("key", ["t4", "a100", "h100", "cpu"])
@pytest.mark.parametrize(("m", "n", "batch"), [(1, 4096, 1), (1, 7, 1), (128, 11008, 1), (4096, 4096, 1), (9, 5, 3)])
def test_tiles_fit_the_device(key: str, m: int, n: int, batch: int) -> None:
    with simulate_device(key) as info:
        tiles = fused_tiles(m, n, batch, info)
    for block in (tiles.block_m, tiles.block_n, tiles.block_k):
        assert block >= 16 and block & (block - 1) == 0  # tl.dot needs powers of two >= 16
    assert tiles.block_m <= max(16, 1 << max(0, m - 1).bit_length())
    if info.is_cuda:
        fp32_tile_bytes = 4 * tiles.block_k * (tiles.block_m + tiles.block_n) * tiles.num_stages
        assert info.shared_memory_per_block_bytes is not None
        assert fp32_tile_bytes <= info.shared_memory_per_block_bytes * 2 // 3  # room for the fp16 operands
        # N's tile is halved, down to 32, until the tiles fill the SMs
        assert (
            tiles.block_n == 32 or batch * math.ceil(m / tiles.block_m) * math.ceil(n / tiles.block_n) >= info.sm_count
        )


@given(numel=st.integers(1, 2**30), key=st.sampled_from(["t4", "h100", "cpu"]))
@settings(max_examples=200, deadline=None)
def test_reduction_programs_cover_every_element_once(numel: int, key: str) -> None:
    with simulate_device(key) as info:
        tiles = fused_tiles(64, 64, 1, info)
    programs, span = largest_finite_programs(numel, tiles)
    assert 1 <= programs <= tiles.partials and span % tiles.reduce_block == 0
    assert (programs - 1) * span < numel <= programs * span


def test_kernel_builds_are_registered_and_follow_the_device() -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="llamatelemetry.kernel_builds")}
    assert eps["tensorcore"].load() is kernel_builds
    with simulate_device("t4") as t4, simulate_device("h100") as h100:
        t4_names = [b.name for b in kernel_builds(t4)]
        h100_names = [b.name for b in kernel_builds(h100)]
    if not HAS_TRITON:
        assert t4_names == h100_names == []
        return
    assert t4_names and not any("bf16" in n for n in t4_names)  # a T4 has no bf16
    assert any("bf16" in n for n in h100_names) and any("128x128" in n for n in h100_names)
    assert sum("largest_finite" in n for n in h100_names) == 2
    for names in (t4_names, h100_names):  # decode shapes split K on both: the GEMM's split form and the split sum
        assert any("split-k" in n for n in names) and any("split_sum" in n for n in names)


def test_a_call_without_facts_is_answered_for_float32_inputs() -> None:
    # `llamatelemetry doctor` asks about a device with no tensors: the fused path's answer is for fp32 inputs.
    with simulate_device("h100") as h100:
        assert fused_scope_reason(CallSpec.for_device(h100)) is None
        with_facts = CallSpec.for_device(h100, facts=MatmulCall(torch.float16, torch.float16))
        assert fused_scope_reason(with_facts) == "float16 inputs need no range scaling"
    with simulate_device("t4") as t4:
        assert fused_scope_reason(CallSpec.for_device(t4)) is None
        bf16 = CallSpec.for_device(t4, facts=MatmulCall(torch.bfloat16, torch.float32))
        assert "bfloat16" in str(fused_scope_reason(bf16))


def _programs(m: int, n: int, batch: int, block_m: int, block_n: int) -> int:
    return batch * math.ceil(m / block_m) * math.ceil(n / block_n)


@pytest.mark.parametrize(("key", "splits"), [("h100", 3), ("a100", 2), ("t4", 2)])
def test_a_decode_product_splits_k_until_the_sms_have_two_programs(key: str, splits: int) -> None:
    with simulate_device(key) as info:
        tiles = fused_tiles(1, 4096, 1, info)
        split = split_k(1, 4096, 4096, 1, tiles, info)
    programs = _programs(1, 4096, 1, tiles.block_m, tiles.block_n)  # 128 of 16 x 32 (64 of 16 x 64 on a T4)
    assert programs < SPLIT_K_PROGRAMS_PER_SM * info.sm_count <= programs * split.splits
    assert split.splits == splits and split.chunk % tiles.block_k == 0
    assert (split.splits - 1) * split.chunk < 4096 <= split.splits * split.chunk


@pytest.mark.parametrize(
    ("key", "m", "k", "n", "batch"),
    [
        ("h100", 4096, 4096, 4096, 1),  # thousands of tiles: no split
        ("h100", 128, 4096, 11008, 4),  # enough tiles with the batch
        ("h100", 1, 511, 4096, 1),  # K too short for two splits of SPLIT_K_MIN_CHUNK
        ("t4", 64, 64, 64, 1),
        ("cpu", 1, 4096, 4096, 1),  # the interpreter has no SMs to fill
    ],
)
def test_no_split_where_the_grid_is_full_k_is_short_or_no_gpu(key: str, m: int, k: int, n: int, batch: int) -> None:
    with simulate_device(key) as info:
        assert split_k(m, n, k, batch, fused_tiles(m, n, batch, info), info).splits == 1


@given(
    key=st.sampled_from(["t4", "a100", "h100"]),
    m=st.integers(1, 4096),
    n=st.integers(1, 16384),
    k=st.integers(1, 2**16),
    batch=st.integers(1, 8),
)
@settings(max_examples=300, deadline=None)
def test_split_k_fills_the_gpu_within_its_limits(key: str, m: int, n: int, k: int, batch: int) -> None:
    with simulate_device(key) as info:
        tiles = fused_tiles(m, n, batch, info)
        split = split_k(m, n, k, batch, tiles, info)
    programs = _programs(m, n, batch, tiles.block_m, tiles.block_n)
    wanted = SPLIT_K_PROGRAMS_PER_SM * info.sm_count
    assert 1 <= split.splits <= SPLIT_K_MAX_SPLITS
    if split.splits == 1:
        assert split.chunk == k
        assert programs >= wanted or k < 2 * SPLIT_K_MIN_CHUNK or batch * m * n * 2 > 2**26
        return
    assert programs < wanted and programs * (split.splits - 1) < wanted  # no more splits than it takes
    assert split.chunk >= SPLIT_K_MIN_CHUNK and split.chunk % tiles.block_k == 0
    assert (split.splits - 1) * split.chunk < k <= split.splits * split.chunk  # every split has work
    assert split.splits * batch * m * n <= 2**26


@given(
    k=st.integers(1, 2**20),
    splits=st.integers(1, 200),
    block_k=st.sampled_from([16, 32, 64]),
    outputs=st.integers(1, 2**27),
)
@settings(max_examples=300, deadline=None)
def test_split_chunks_cover_k_in_whole_steps(k: int, splits: int, block_k: int, outputs: int) -> None:
    split = split_chunks(k, splits, block_k, outputs)
    assert 1 <= split.splits <= splits
    assert split.splits * outputs <= 2**26 or split.splits == 1  # the workspace of partial sums stays bounded
    if split.splits == 1:
        assert split.chunk == k
    else:
        assert split.chunk % block_k == 0 and (split.splits - 1) * split.chunk < k <= split.splits * split.chunk
