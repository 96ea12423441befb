"""pytest-benchmark timings of llamatelemetry-flashattn's attention beside PyTorch SDPA, fp16, on one GPU.

Run on a GPU machine: ``pytest benchmarks/flashattn --benchmark-only`` (skipped without CUDA by the ``gpu``
marker). Each case is captured ``launches`` times in one CUDA graph and each round replays it and synchronizes
(see ``benchmarks/conftest.py``). Llama 3 8B's attention (32 query heads over 8 KV heads, head dim 128):

* ``prefill``: ``flash_attention_forward`` causal over 4096 tokens, beside SDPA (``is_causal``, GQA); TFLOP/s
  count the causal half of the score matrix (``2 B H S^2 D``).
* ``decode``: one query per sequence over 4096 cached tokens, batch 16, beside SDPA; GB/s count the K and V
  bytes read.
* ``paged-decode``: ``paged_decode`` over the same context in shuffled 16-token pages, beside what PyTorch does
  with a paged cache: gather the pages to contiguous tensors, then SDPA.

Before timing, each output is checked once against the package's fp32 reference (the attention tolerance of the
package's tests: 4x the fp16 table).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from llamatelemetry_core.testing.bench import CapturedPair

pytestmark = pytest.mark.gpu

FP16 = torch.float16
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
PREFILL_TOKENS = 4096
DECODE_BATCH, CONTEXT, PAGE_SIZE = 16, 4096, 16
ATTENTION_TOLERANCE = 4.0  # times the fp16 table: fp16 probabilities times fp16 values, as the package's tests


@dataclass
class Case:
    ours: Callable[[], object]
    torch_call: Callable[[], object]
    launches: int
    moved_bytes: int = 0
    flops: int = 0


def _randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=FP16, generator=gen)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """SDPA on ``[B, S, H, D]`` tensors (transposed to its ``[B, H, S, D]``), grouped-query."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    )
    return out.transpose(1, 2)


def _prefill(close: Callable[..., None]) -> Case:
    from llamatelemetry_flashattn import attention_reference, flash_attention_forward

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = _randn(1, PREFILL_TOKENS, HEADS, HEAD_DIM, gen=gen)
    k = _randn(1, PREFILL_TOKENS, KV_HEADS, HEAD_DIM, gen=gen)
    v = _randn(1, PREFILL_TOKENS, KV_HEADS, HEAD_DIM, gen=gen)

    def ours() -> torch.Tensor:
        return flash_attention_forward(q, k, v, causal=True, training=False)

    close(ours(), attention_reference(q, k, v, causal=True), name="prefill", scale=ATTENTION_TOLERANCE)
    flops = 2 * HEADS * PREFILL_TOKENS**2 * HEAD_DIM  # 4 B H S^2 D, halved by the causal mask
    return Case(ours, lambda: _sdpa(q, k, v, True), launches=4, flops=flops)


def _decode(close: Callable[..., None]) -> Case:
    from llamatelemetry_flashattn import attention_reference, flash_attention_forward

    gen = torch.Generator(device="cuda").manual_seed(1)
    q = _randn(DECODE_BATCH, 1, HEADS, HEAD_DIM, gen=gen)
    k = _randn(DECODE_BATCH, CONTEXT, KV_HEADS, HEAD_DIM, gen=gen)
    v = _randn(DECODE_BATCH, CONTEXT, KV_HEADS, HEAD_DIM, gen=gen)

    def ours() -> torch.Tensor:
        return flash_attention_forward(q, k, v, causal=True, training=False)

    close(ours(), attention_reference(q, k, v, causal=True), name="decode", scale=ATTENTION_TOLERANCE)
    # One query row sees every key: SDPA's is_causal (aligned to the top left) would hide all but the first.
    return Case(ours, lambda: _sdpa(q, k, v, False), launches=8, moved_bytes=k.nbytes + v.nbytes)


def _paged_decode(close: Callable[..., None]) -> Case:
    from llamatelemetry_core.kv_layout import PagedKV
    from llamatelemetry_flashattn import paged_decode

    gen = torch.Generator(device="cuda").manual_seed(2)
    per_seq = CONTEXT // PAGE_SIZE
    num_blocks = DECODE_BATCH * per_seq + 1
    kv = PagedKV(
        _randn(num_blocks, PAGE_SIZE, KV_HEADS, HEAD_DIM, gen=gen),
        _randn(num_blocks, PAGE_SIZE, KV_HEADS, HEAD_DIM, gen=gen),
    )
    # Blocks scattered over the pool, as a long-running server leaves them.
    order = torch.randperm(num_blocks, device="cuda", generator=gen)[: DECODE_BATCH * per_seq]
    block_tables = order.view(DECODE_BATCH, per_seq).to(torch.int32)
    seq_lens = torch.full((DECODE_BATCH,), CONTEXT, dtype=torch.int32, device="cuda")
    q = _randn(DECODE_BATCH, HEADS, HEAD_DIM, gen=gen)
    out = torch.empty_like(q)

    def ours() -> torch.Tensor:
        return paged_decode(q, kv, block_tables, seq_lens, out=out)

    def gather_then_sdpa() -> torch.Tensor:
        index = block_tables.long()
        k = kv.key_cache[index].view(DECODE_BATCH, CONTEXT, KV_HEADS, HEAD_DIM)
        v = kv.value_cache[index].view(DECODE_BATCH, CONTEXT, KV_HEADS, HEAD_DIM)
        return _sdpa(q.unsqueeze(1), k, v, False).squeeze(1)

    reference = paged_decode(q, kv, block_tables, seq_lens, backend="reference")
    close(ours().clone(), reference, name="paged decode", scale=ATTENTION_TOLERANCE)
    close(gather_then_sdpa(), reference, name="gather then SDPA (the baseline)", scale=ATTENTION_TOLERANCE)
    moved = 2 * DECODE_BATCH * CONTEXT * KV_HEADS * HEAD_DIM * 2  # K and V of every cached token, fp16
    return Case(ours, gather_then_sdpa, launches=8, moved_bytes=moved)


CASES: dict[str, Callable[[Callable[..., None]], Case]] = {
    f"prefill-causal-{PREFILL_TOKENS}": _prefill,
    f"decode-{DECODE_BATCH}x{CONTEXT}": _decode,
    f"paged-decode-{DECODE_BATCH}x{CONTEXT}-page{PAGE_SIZE}": _paged_decode,
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, close: Callable[..., None], recorded: Any) -> CapturedPair:
    built = CASES[request.param](close)
    _, chosen = recorded(built.ours)  # which implementation the library chose, and not the reference
    return CapturedPair.capture(
        f"flashattn {request.param} fp16",
        built.ours,
        built.torch_call,
        launches=built.launches,
        moved_bytes=built.moved_bytes,
        flops=built.flops,
        implementations=chosen,
    )


@pytest.mark.parametrize("side", ["flashattn", "torch"])
def test_attention(gpu_bench: Any, case: CapturedPair, side: str) -> None:
    gpu_bench.pair(case, ours=side == "flashattn")
