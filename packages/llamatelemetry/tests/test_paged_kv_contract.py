"""The paged KV contract end to end: what llamatelemetry-kvcache stores, llamatelemetry-flashattn reads.

The two packages meet only through ``llamatelemetry_core.kv_layout``; this test (in the meta-package, which
installs both) writes a ragged batch through ``PagedKVCache`` and its block manager, then checks paged attention
over ``cache.layer(i)`` against exact attention over the same K/V gathered back to contiguous tensors.
"""

from __future__ import annotations

import pytest
import torch

from llamatelemetry.inference.flash_attn import attention_reference
from llamatelemetry.inference.kv_cache import KVCacheConfig, PagedKVCache
from llamatelemetry_core.testing import assert_close

flashattn = pytest.importorskip("llamatelemetry_flashattn")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kv_dtype", [None, torch.int8], ids=["same", "int8"])
@pytest.mark.parametrize("page_size", [1, 4])
def test_paged_attention_reads_what_the_paged_cache_wrote(
    dtype: torch.dtype, kv_dtype: torch.dtype | None, page_size: int
) -> None:
    heads, kv_heads, dim = 4, 2, 16
    config = KVCacheConfig(3, 32, 1, heads, dim, dtype, num_kv_heads=kv_heads, device="cpu", kv_dtype=kv_dtype)
    cache = PagedKVCache(config, page_size=page_size, num_blocks=64 // page_size + 4)
    manager = cache.block_manager
    prompts = {0: 7, 1: 1, 2: 10}  # lengths ending mid-block, and a one-token prompt
    for seq_id, n in prompts.items():
        manager.allocate(seq_id, list(range(100 * seq_id, 100 * seq_id + n)))
    slots = cache.slot_mapping([(s, 0, n) for s, n in prompts.items()])
    total = sum(prompts.values())
    cache.write(0, torch.randn(total, kv_heads, dim).to(dtype), torch.randn(total, kv_heads, dim).to(dtype), slots)
    for seq_id in prompts:  # one decode step: a new token each
        manager.append(seq_id, [1])
    slots = cache.slot_mapping([(s, n, n + 1) for s, n in prompts.items()])
    cache.write(0, torch.randn(3, kv_heads, dim).to(dtype), torch.randn(3, kv_heads, dim).to(dtype), slots)

    ids = list(prompts)
    block_tables, seq_lens = cache.block_tables(ids)
    q = torch.randn(3, heads, dim).to(dtype)  # the decode step's queries, one per sequence
    cu_seqlens_q = torch.arange(4, dtype=torch.int32)
    out = flashattn.paged_attention(q, cache.layer(0), block_tables, seq_lens, cu_seqlens_q, max_seqlen_q=1)
    for row, seq_id in enumerate(ids):
        k, v = cache.gather(seq_id, 0)  # dequantized, contiguous [tokens, kv_heads, dim]
        want = attention_reference(q[row][None, None], k[None], v[None], causal=True)[0, 0]
        assert_close(out[row], want, name=f"sequence {seq_id}")
