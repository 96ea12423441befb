"""Launch configurations: pure functions of shape, dtype and device that always cover the row and fit the GPU."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamatelemetry_core.device import DeviceInfo, simulate_device
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_triton.heuristics import (
    LINEAR_MAX_ROWS,
    LINEAR_TABLES,
    NORM_BWD_MAX_HELD_ROW,
    NORM_BWD_SUM_BLOCK,
    SOFTMAX_MAX_SPLITS,
    current_max_block_size,
    elementwise_config,
    force_max_block_size,
    glu_config,
    linear_config,
    linear_device_class,
    next_power_of_2,
    norm_config,
    rope_config,
    softmax_config,
)

DEVICES = ["t4", "a100", "h100", "cpu"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def _device(key: str) -> DeviceInfo:
    with simulate_device(key) as device:
        return device


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@settings(max_examples=200, deadline=None)
@given(
    n_cols=st.integers(1, 300_000),
    dtype=st.sampled_from(DTYPES),
    key=st.sampled_from(DEVICES),
    backward=st.booleans(),
    cap=st.sampled_from([None, 16, 256]),
    layernorm=st.booleans(),
)
def test_norm_config_covers_the_row_and_fits(
    n_cols: int, dtype: torch.dtype, key: str, backward: bool, cap: int | None, layernorm: bool
) -> None:
    device = _device(key)
    config = norm_config(n_cols, dtype, device, backward=backward, max_block=cap, layernorm=layernorm)
    assert _is_power_of_2(config.block_size) and _is_power_of_2(config.num_warps)
    assert config.num_warps <= (32 if config.reread_row else 16)
    assert config.single_block == (config.block_size >= n_cols)
    if config.reread_row:  # only a backward row too long to hold, of 2 bytes, in vector loads
        assert backward and config.single_block and config.block_size > NORM_BWD_MAX_HELD_ROW
        assert dtype.itemsize == 2 and n_cols % 16 == 0
    if config.unrolled:  # a re-read row's first read, in blocks that cover the row
        assert config.reread_row and config.unrolled * config.chunk_size == config.block_size
    if config.reread_row:
        assert config.chunk_size == NORM_BWD_SUM_BLOCK
    if cap is not None:
        assert config.block_size <= cap
    if device.shared_memory_per_block_bytes is not None and not config.single_block:  # loops are pipelined
        stage_bytes = config.block_size * dtype.itemsize * 2 * config.num_stages
        assert stage_bytes <= device.shared_memory_per_block_bytes // 2
    assert config == norm_config(n_cols, dtype, device, backward=backward, max_block=cap, layernorm=layernorm)


@pytest.mark.parametrize("key", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_forward_reads_rows_up_to_16384_once(key: str, dtype: torch.dtype) -> None:
    # A 405B model's hidden size stays in registers in the forward.
    device = _device(key)
    assert norm_config(16384, dtype, device).single_block
    assert not norm_config(16385, dtype, device).single_block


@pytest.mark.parametrize("key", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_backward_takes_rows_up_to_16384_in_one_block_for_2_byte_dtypes(key: str, dtype: torch.dtype) -> None:
    # Held in registers up to 8192; read twice up to 16384 (2-byte rows in vector loads); looped beyond.
    device = _device(key)
    held = norm_config(8192, dtype, device, backward=True)
    assert held.single_block and not held.reread_row
    for n in (8208, 12288, 16384):
        # 2-byte rows in one block: RMSNorm holds them in 16 warps, LayerNorm reads them twice in 32 (timed).
        rms, ln = (norm_config(n, dtype, device, backward=True, layernorm=flag) for flag in (False, True))
        two_bytes = dtype.itemsize == 2
        assert rms.single_block == ln.single_block == ln.reread_row == two_bytes, (n, rms, ln)
        assert not rms.reread_row and rms.unrolled == ln.unrolled == 0
        if two_bytes:
            assert (rms.block_size, rms.num_warps, ln.block_size, ln.num_warps) == (16384, 16, 16384, 32)
            assert ln.chunk_size == NORM_BWD_SUM_BLOCK
        else:
            assert not rms.single_block and rms.block_size == ln.block_size == 4096
    for n in (16385, 12289):  # too long, or not a multiple of 16 (scalar loads would not fit)
        for flag in (False, True):
            assert not norm_config(n, dtype, device, backward=True, layernorm=flag).single_block


@pytest.mark.parametrize("key", ["t4", "a100", "h100"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_forward_keeps_rows_up_to_8192_in_at_most_8_warps(key: str, dtype: torch.dtype) -> None:
    device = _device(key)
    for n in (768, 4096, 8192):
        ln, rms = norm_config(n, dtype, device, layernorm=True), norm_config(n, dtype, device)
        assert ln.num_warps == min(rms.num_warps, 8) and ln.block_size == rms.block_size
    assert norm_config(16384, dtype, device, layernorm=True).num_warps == 16  # 8 would need 230-255 registers
    backward = norm_config(8192, dtype, device, backward=True)
    assert norm_config(8192, dtype, device, backward=True, layernorm=True) == backward  # forward only


@settings(max_examples=200, deadline=None)
@given(
    n_rows=st.integers(1, 100_000),
    n_cols=st.integers(1, 300_000),
    dtype=st.sampled_from(DTYPES),
    key=st.sampled_from(DEVICES),
    cap=st.sampled_from([None, 16, 1024]),
)
def test_softmax_splits_cover_each_row_exactly(
    n_rows: int, n_cols: int, dtype: torch.dtype, key: str, cap: int | None
) -> None:
    config = softmax_config(n_rows, n_cols, dtype, _device(key), max_block=cap)
    assert _is_power_of_2(config.block_size)
    if config.single_block:
        assert config.block_size >= n_cols and config.splits == 1
        return
    assert config.chunk_size % config.block_size == 0
    assert config.splits * config.chunk_size >= n_cols > (config.splits - 1) * config.chunk_size
    assert 1 <= config.splits <= SOFTMAX_MAX_SPLITS


def test_long_rows_are_split_only_when_rows_are_few() -> None:
    h100 = _device("h100")
    few = softmax_config(32, 128256, torch.float16, h100)
    assert not few.single_block and few.splits * 32 >= 2 * h100.sm_count
    many = softmax_config(16384, 128256, torch.float16, h100)
    assert many.splits == 1
    assert softmax_config(16384, 8192, torch.float16, h100).single_block


@pytest.mark.parametrize("key", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_glu_and_rope_configs(key: str, dtype: torch.dtype) -> None:
    device = _device(key)
    for numel in (1, 17, 4096 * 4096):
        for strided in (False, True):
            config = elementwise_config(numel, dtype, device, strided=strided)
            assert _is_power_of_2(config.block_size) and config.block_size >= 16
            assert config.block_size * dtype.itemsize <= 8192
    for n in (1, 768, 14336):
        glu = glu_config(n, dtype, device)
        assert glu.single_block == (glu.block_size >= n)
    rope = rope_config(64, 32, dtype, device)
    assert rope.block_size == 64 and _is_power_of_2(rope.chunk_size) and rope.chunk_size * rope.block_size <= 2048


def test_force_max_block_size_is_scoped_and_validated() -> None:
    assert current_max_block_size() is None
    with force_max_block_size(32):
        assert current_max_block_size() == 32
        with force_max_block_size(16):
            assert current_max_block_size() == 16
        assert current_max_block_size() == 32
    assert current_max_block_size() is None
    for bad in (0, 8, 48, True, 64.0):
        with pytest.raises(ConfigurationError, match="power of two >= 16"), force_max_block_size(bad):  # type: ignore[arg-type]
            pass


def test_next_power_of_2() -> None:
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 768, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, LINEAR_MAX_ROWS),
    n=st.integers(1, 200_000),
    k=st.integers(1, 30_000),
    dtype=st.sampled_from(DTYPES),
    key=st.sampled_from(DEVICES),
    cap=st.sampled_from([None, 16, 256]),
)
def test_linear_config_stays_in_its_table_row(
    rows: int, n: int, k: int, dtype: torch.dtype, key: str, cap: int | None
) -> None:
    device = _device(key)
    table = LINEAR_TABLES[linear_device_class(device)]
    config = linear_config(rows, n, k, dtype, device, max_block=cap)
    block_n, block_k = config.block_size, config.chunk_size
    assert _is_power_of_2(block_n) and _is_power_of_2(block_k)
    whole_k = max(16, next_power_of_2(k))
    wide = whole_k > 4096
    per_sm = table.hoist_programs_per_sm // 2 if wide else table.hoist_programs_per_sm
    hoisted = (
        next_power_of_2(rows) * whole_k <= table.hoist_elements
        and (cap is None or cap >= whole_k)
        and -(-n // table.hoist_block_n) > per_sm * device.sm_count  # a grid smaller than the blocks
    )
    assert (config.programs > 0) == hoisted
    if hoisted:  # a persistent grid; each program holds its input rows whole, K in one block
        assert (block_n, block_k) == (table.hoist_block_n, whole_k)
        assert next_power_of_2(rows) * block_n * block_k <= table.max_tile
        assert config.programs == per_sm * device.sm_count and config.num_warps == (8 if wide else 4)
        return
    assert 16 <= block_k <= max(16, min(table.block_k, cap or table.block_k, next_power_of_2(k)))
    assert block_n <= table.max_block_n
    assert block_n == 1 or next_power_of_2(rows) * block_n * block_k <= table.max_tile
    # Wider programs only while the grid still gives every SM its programs.
    assert block_n == 1 or -(-n // block_n) >= table.programs_per_sm * device.sm_count
    assert (config.num_warps, config.num_stages) == (table.num_warps, table.num_stages)


def test_linear_device_classes() -> None:
    assert [linear_device_class(_device(key)) for key in ("t4", "a100", "h100", "cpu")] == [
        "sm75",
        "sm80",
        "sm90",
        "cpu",
    ]
    # Llama-3.2-1B's decode projections at one row on an H100: the in-graph sweep's fastest launches, persistent
    # (two weight rows per block, the next block's loaded ahead), K whole: 528 programs of 4 warps at K = 2048,
    # 264 of 8 warps for down's K = 8192.
    h100 = _device("h100")
    for n, k in ((3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)):
        config = linear_config(1, n, k, torch.float16, h100)
        wide = k > 4096
        assert (config.block_size, config.chunk_size, config.num_warps) == (2, k, 8 if wide else 4)
        assert config.programs == (2 if wide else 4) * h100.sm_count
    # Eight rows of K = 2048 do not fit in one program's registers: the loop over K, a program per block.
    config = linear_config(8, 3072, 2048, torch.float16, h100)
    assert config.programs == 0 and config.chunk_size < 2048
    # Fewer column blocks than programs (SmolLM2's merged q/k/v, 960 rows: 480 blocks of 2 for 528 programs):
    # the loop over K, a program per block.
    assert linear_config(1, 960, 576, torch.float16, h100).programs == 0
    # No persistent launch where none was timed: the T4 and A100 rows loop over K.
    for key in ("t4", "a100"):
        assert linear_config(1, 2048, 2048, torch.float16, _device(key)).programs == 0
