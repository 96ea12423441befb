"""The arg-max kernel against ``torch.argmax(x, dim=-1)``, bit for bit: ties, NaN, signed zeros, infinities,
strided rows, rows cut into chunks (a forced small block under the interpreter), and the vocabularies of real
models on a GPU."""

from __future__ import annotations

import pytest
import torch

import llamatelemetry_triton as lt
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.selection import record_selections
from llamatelemetry_triton import force_max_block_size
from llamatelemetry_triton._dispatch import device_info
from llamatelemetry_triton.heuristics import argmax_config, current_max_block_size

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# bfloat16 runs the reference under the interpreter (NumPy has no bfloat16): its kernel is compared on GPUs.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def _hostile(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with the cases an arg-max gets wrong: two equal maxima (the first must win), a NaN late in a
    row (it beats every number), a row of -inf only (index 0), a row of zeros with a -0.0 first (-0.0 == 0.0:
    index 0), and a row whose maximum is its last element."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen).to(dtype)
    if cols > 2:
        x[:, cols // 3] = x.float().max() + 1
        x[:, 2 * cols // 3] = x[:, cols // 3]
    if rows > 1:
        x[1, cols - 1] = float("nan")
    if rows > 2:
        x[2] = float("-inf")
    if rows > 3:
        x[3] = 0.0
        x[3, 0] = -0.0
    if rows > 4:
        x[4, cols - 1] = float("inf")
    return x.to(DEVICE)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols", "block"), [(1, 1, None), (5, 7, None), (6, 100, 16), (3, 1000, 64)])
def test_the_first_largest_index_of_every_row(rows: int, cols: int, block: int | None, dtype: torch.dtype) -> None:
    # A forced block of 16 or 64 elements cuts the rows into chunks (the interpreter takes three per row): the
    # chunk keys and the launch that combines them are exercised, the ragged last block and chunk too.
    x = _hostile(rows, cols, dtype, rows * cols)
    with force_max_block_size(block or 4096), record_selections() as rec:
        got = lt.triton_argmax(x)
    assert rec.implementations("triton.argmax") == [
        "reference" if dtype == torch.bfloat16 and DEVICE.type == "cpu" else "triton"
    ]
    assert got.dtype == torch.int64 and torch.equal(got, x.argmax(-1)), (got.tolist(), x.argmax(-1).tolist())


@pytest.mark.triton
def test_chunked_rows_are_combined_in_index_order() -> None:
    # The largest value in every chunk of a row, equal: the chunk keys tie on the value, and the smallest index
    # (the first chunk's) must win; then a NaN in the last chunk beats them all.
    with force_max_block_size(16):
        config = argmax_config(2, 200, device_info(DEVICE), max_block=current_max_block_size())
        assert config.splits > 1
        x = torch.zeros(2, 200, device=DEVICE)
        x[:, :: config.chunk_size] = 5.0
        x[1, -1] = float("nan")
        assert lt.triton_argmax(x).tolist() == [0, 199]


@pytest.mark.triton
def test_strided_batched_and_scalar_inputs() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 40, generator=gen).to(DEVICE)
    assert torch.equal(lt.triton_argmax(x), x.argmax(-1))  # leading dimensions kept: [2, 3]
    view = torch.randn(40, 6, generator=gen).to(DEVICE).t()[1:4]  # rows at a stride, not unit-stride rows
    assert torch.equal(lt.triton_argmax(view), view.argmax(-1))
    scalar = torch.tensor(2.5, device=DEVICE)
    assert torch.equal(lt.triton_argmax(scalar), scalar.argmax(-1))
    assert lt.triton_argmax(torch.empty(0, 7, device=DEVICE)).shape == (0,)


def test_bad_input_is_refused_with_what_was_expected() -> None:
    with pytest.raises(ConfigurationError, match=r"at least one element along the last dimension.*\[3, 0\]"):
        lt.triton_argmax(torch.empty(3, 0))
    with pytest.raises(ConfigurationError, match="floating-point"):
        lt.triton_argmax(torch.arange(4))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        lt.triton_argmax([1.0, 2.0])  # type: ignore[arg-type]


def test_launch_config_fills_the_gpu_with_chunks_of_whole_blocks() -> None:
    from llamatelemetry_core.device import simulate_device

    with simulate_device("h100") as h100:
        pass
    for rows in (1, 8, 64, 300, 600):
        config = argmax_config(rows, 128256, h100)
        assert config.chunk_size % config.block_size == 0
        assert (config.splits - 1) * config.chunk_size < 128256 <= config.splits * config.chunk_size
        assert config.chunk_size >= 4 * config.block_size or config.splits == 1
        # two programs per SM, or as many as chunks of about four blocks (at least four) allow
        assert rows * config.splits >= 2 * h100.sm_count or config.chunk_size < 8 * config.block_size
    assert argmax_config(600, 128256, h100).splits == 1  # 600 rows fill 132 SMs: a row per program
    assert argmax_config(4, 100, h100).splits == 1  # a short row is one chunk


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [1, 3, 64, 257])
@pytest.mark.parametrize("vocab", [49152, 128256, 151936])
def test_model_vocabularies_on_the_gpu(vocab: int, rows: int, dtype: torch.dtype) -> None:
    # SmolLM2's, Llama 3's and Qwen2's vocabularies; every row with equal maxima, some with NaN or all -inf; then
    # replayed from a CUDA graph on new logits.
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("bfloat16 needs compute capability >= 8.0")
    x = _hostile(rows, vocab, dtype, vocab + rows)
    assert torch.equal(lt.triton_argmax(x), x.argmax(-1))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lt.triton_argmax(x)
    x.copy_(torch.randn(x.shape, device=x.device).to(dtype))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, x.argmax(-1))
