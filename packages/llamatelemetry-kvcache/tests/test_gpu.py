"""On a GPU: a decode step that updates the cache is captured into a CUDA graph and replayed with new positions."""

from __future__ import annotations

import pytest
import torch

from llamatelemetry_kvcache import KVCache, KVCacheConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kv_dtype", [None, torch.int8], ids=["fp16", "int8"])
def test_decode_step_is_captured_and_replayed_at_new_positions(kv_dtype: torch.dtype | None) -> None:
    graphs = pytest.importorskip("llamatelemetry_graphs")
    layers, batch, kv_heads, dim = 2, 3, 2, 64
    config = KVCacheConfig(batch, 32, layers, 4, dim, torch.float16, num_kv_heads=kv_heads, kv_dtype=kv_dtype)
    cache = KVCache(config)
    for layer in range(layers):  # a ragged prefill on the host path
        new = torch.randn(batch, 5, kv_heads, dim, device="cuda", dtype=torch.float16)
        cache.update(layer, new, new, num_new_tokens=[5, 2, 4])
    cache.prepare_static()
    keys = torch.zeros(batch, 1, kv_heads, dim, device="cuda", dtype=torch.float16)
    values = torch.zeros_like(keys)
    positions = torch.tensor(cache.lengths, device="cuda")

    def decode_step() -> torch.Tensor:
        total = torch.zeros((), device="cuda")
        for layer in range(layers):
            k, v = cache.update(layer, keys, values, positions=positions)
            total = total + k.float().sum() + v.float().sum()
        return total

    graph = graphs.capture_graph(decode_step, inputs=[keys, values, positions])
    assert graph.is_cuda_graph
    for step in range(4):
        new_k = torch.randn_like(keys)
        new_v = torch.randn_like(values)
        pos = torch.tensor([5 + step, 2 + step, 4 + step], device="cuda")
        graph.replay(new_k, new_v, pos)
        for layer in range(layers):
            stored_k, stored_v = cache.storage(layer)
            scales = cache.scales(layer)
            for i in range(batch):
                got_k, got_v = stored_k[i, int(pos[i])], stored_v[i, int(pos[i])]
                if scales is not None:
                    p = int(pos[i])
                    got_k = got_k.float() * scales[0][i, p].unsqueeze(-1)
                    got_v = got_v.float() * scales[1][i, p].unsqueeze(-1)
                    step_size = new_k[i, 0].float().abs().amax(-1, keepdim=True) / 127
                    assert ((got_k - new_k[i, 0].float()).abs() <= step_size).all()
                    assert ((got_v - new_v[i, 0].float()).abs() <= step_size.max() * 4).all()
                else:
                    assert torch.equal(got_k, new_k[i, 0]) and torch.equal(got_v, new_v[i, 0])
    cache.set_lengths(pos + 1)
    assert cache.lengths == [9, 6, 8]
