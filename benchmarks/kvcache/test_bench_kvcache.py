"""pytest-benchmark timings of llamatelemetry-kvcache's per-step work beside plain PyTorch indexing, on one GPU.

Run on a GPU machine: ``pytest benchmarks/kvcache --benchmark-only`` (skipped without CUDA by the ``gpu``
marker). fp16, 8 KV heads of 128 (Llama 3 8B), one layer. Cases:

* ``paged-write``: ``paged_write`` (the Triton kernel) of a decode step (one token for each of 64 sequences)
  and of a prefill chunk (8192 tokens) through a slot mapping into shuffled 16-token pages, beside PyTorch's
  ``index_copy_`` into the flattened store. CUDA graph of ``launches`` calls per round.
* ``append``: ``KVCache.update`` of one token per sequence (batch 64) on the graph-safe path (positions on the
  device), beside PyTorch's ``index_put_`` at the same places. CUDA graph of ``launches`` calls per round.
* ``gather``: ``PagedKVCache.gather`` of every sequence of a step (16 sequences of 1024 tokens) back to contiguous
  K/V, beside ``index_select`` through block indices already on the device. It builds its index from the host's
  block table, which a CUDA graph cannot hold, so each round is one call from Python, synchronized at the end.

GB/s count the K/V bytes read and written once. Before timing, each case checks that what it writes or reads is
exactly the data (these are copies: no tolerance).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from llamatelemetry_core.testing.bench import CapturedPair

pytestmark = pytest.mark.gpu

FP16 = torch.float16
KV_HEADS, HEAD_DIM, PAGE_SIZE = 8, 128, 16
STEP_BATCH = 64
WRITE_TOKENS = {"decode-step-64": (STEP_BATCH, 100), "prefill-chunk-8192": (8192, 10)}  # tokens, launches
GATHER_SEQS, GATHER_TOKENS = 16, 1024


def _randn(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=FP16, generator=gen)


@pytest.fixture(scope="module", params=list(WRITE_TOKENS))
def write_case(request: pytest.FixtureRequest, recorded: Any) -> CapturedPair:
    from llamatelemetry_core.kv_layout import PagedKV
    from llamatelemetry_kvcache import paged_write

    tokens, launches = WRITE_TOKENS[request.param]
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    num_blocks = max(4096, 2 * tokens // PAGE_SIZE)
    store = PagedKV(
        torch.zeros(num_blocks, PAGE_SIZE, KV_HEADS, HEAD_DIM, device="cuda", dtype=FP16),
        torch.zeros(num_blocks, PAGE_SIZE, KV_HEADS, HEAD_DIM, device="cuda", dtype=FP16),
    )
    key, value = _randn(tokens, KV_HEADS, HEAD_DIM, gen=gen), _randn(tokens, KV_HEADS, HEAD_DIM, gen=gen)
    slots = torch.randperm(num_blocks * PAGE_SIZE, device="cuda", generator=gen)[:tokens]  # scattered pages
    flat_k = store.key_cache.view(-1, KV_HEADS, HEAD_DIM)
    flat_v = store.value_cache.view(-1, KV_HEADS, HEAD_DIM)
    spare_k, spare_v = torch.zeros_like(flat_k), torch.zeros_like(flat_v)

    def ours() -> None:
        paged_write(key, value, store, slots)

    def index_copy() -> None:
        spare_k.index_copy_(0, slots, key)
        spare_v.index_copy_(0, slots, value)

    _, chosen = recorded(ours)  # the Triton kernel, not the reference
    assert torch.equal(flat_k[slots], key) and torch.equal(flat_v[slots], value), "paged_write: wrong slots"
    group = f"kvcache paged-write {request.param} fp16"
    # Read K and V, write them: the slot mapping and the untouched store are not counted.
    return CapturedPair.capture(
        group,
        ours,
        index_copy,
        launches=launches,
        baseline_name="index_copy_",
        moved_bytes=4 * key.nbytes,
        implementations=chosen,
    )


@pytest.mark.parametrize("side", ["kvcache", "torch"])
def test_paged_write(gpu_bench: Any, write_case: CapturedPair, side: str) -> None:
    gpu_bench.pair(write_case, ours=side == "kvcache")


@pytest.fixture(scope="module")
def append_case() -> CapturedPair:
    from llamatelemetry_kvcache import KVCache, KVCacheConfig

    launches = 100
    cache = KVCache(KVCacheConfig(STEP_BATCH, 4096, 1, 32, HEAD_DIM, FP16, num_kv_heads=KV_HEADS))
    gen = torch.Generator(device="cuda").manual_seed(3)
    k, v = _randn(STEP_BATCH, 1, KV_HEADS, HEAD_DIM, gen=gen), _randn(STEP_BATCH, 1, KV_HEADS, HEAD_DIM, gen=gen)
    positions = torch.randint(0, 4095, (STEP_BATCH,), device="cuda", generator=gen)
    store_k, store_v = cache.storage(0)
    rows = torch.arange(STEP_BATCH, device="cuda")
    spare_k, spare_v = torch.zeros_like(store_k), torch.zeros_like(store_v)

    def ours() -> None:
        cache.update(0, k, v, positions=positions)

    def index_put() -> None:
        spare_k.index_put_((rows, positions), k[:, 0])
        spare_v.index_put_((rows, positions), v[:, 0])

    ours()
    assert torch.equal(store_k[rows, positions], k[:, 0]) and torch.equal(store_v[rows, positions], v[:, 0])
    return CapturedPair.capture(  # plain indexing: no operation to dispatch, no implementation to record
        "kvcache append decode-step-64 fp16",
        ours,
        index_put,
        launches=launches,
        baseline_name="index_put_",
        moved_bytes=4 * k.nbytes,
    )


@pytest.mark.parametrize("side", ["kvcache", "torch"])
def test_append(gpu_bench: Any, append_case: CapturedPair, side: str) -> None:
    gpu_bench.pair(append_case, ours=side == "kvcache")


@dataclass
class Gather:
    ours: Callable[[], object]
    torch_call: Callable[[], object]
    moved_bytes: int


@pytest.fixture(scope="module")
def gather_case() -> Gather:
    from llamatelemetry_kvcache import KVCacheConfig, PagedKVCache

    config = KVCacheConfig(GATHER_SEQS, GATHER_TOKENS, 1, 32, HEAD_DIM, FP16, num_kv_heads=KV_HEADS)
    cache = PagedKVCache(config, PAGE_SIZE, num_blocks=GATHER_SEQS * GATHER_TOKENS // PAGE_SIZE + 64)
    gen = torch.Generator(device="cuda").manual_seed(4)
    written: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for seq_id in range(GATHER_SEQS):
        cache.block_manager.allocate(seq_id, [(seq_id * 31 + i) % 32000 for i in range(GATHER_TOKENS)])
        k = _randn(GATHER_TOKENS, KV_HEADS, HEAD_DIM, gen=gen)
        v = _randn(GATHER_TOKENS, KV_HEADS, HEAD_DIM, gen=gen)
        cache.write(0, k, v, cache.slot_mapping([(seq_id, 0, GATHER_TOKENS)]))
        written[seq_id] = (k, v)
    for seq_id, (k, v) in written.items():
        got_k, got_v = cache.gather(seq_id, 0)
        assert torch.equal(got_k, k) and torch.equal(got_v, v), f"gather: sequence {seq_id} reads back wrong"
    store = cache.layer(0)
    indices = [
        torch.tensor(cache.block_manager.block_table(s), dtype=torch.long, device="cuda") for s in range(GATHER_SEQS)
    ]

    def ours() -> None:
        for seq_id in range(GATHER_SEQS):
            cache.gather(seq_id, 0)

    def index_select() -> None:
        for index in indices:
            store.key_cache.index_select(0, index)
            store.value_cache.index_select(0, index)

    moved = 2 * sum(k.nbytes + v.nbytes for k, v in written.values())  # read and write K and V once
    return Gather(ours, index_select, moved)


@pytest.mark.parametrize("side", ["kvcache", "torch"])
def test_gather(gpu_bench: Any, gather_case: Gather, side: str) -> None:
    fn = gather_case.ours if side == "kvcache" else gather_case.torch_call
    group = f"kvcache gather {GATHER_SEQS}x{GATHER_TOKENS} fp16"
    gpu_bench.synchronized(group, fn, moved_bytes=gather_case.moved_bytes)
