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

    def decode_step(step_keys: torch.Tensor, step_values: torch.Tensor, step_positions: torch.Tensor) -> torch.Tensor:
        # capture_graph calls fn(*inputs): the static inputs, which replay() copies new values into.
        total = torch.zeros((), device="cuda")
        for layer in range(layers):
            k, v = cache.update(layer, step_keys, step_values, positions=step_positions)
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


FP8 = getattr(torch, "float8_e4m3fn", None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kv_dtype", [None, torch.int8, FP8], ids=["same", "int8", "fp8"])
def test_paged_write_kernel_matches_the_reference_at_model_sizes(
    dtype: torch.dtype, kv_dtype: torch.dtype | None
) -> None:
    from llamatelemetry_core.device import get_device_info
    from llamatelemetry_core.kv_layout import PAD_SLOT
    from llamatelemetry_kvcache import PagedKVCache, paged_write, paged_write_reference

    info = get_device_info()
    if dtype == torch.bfloat16 and not info.supports_bf16:
        pytest.skip(f"{info.name} has no bf16")
    fp8 = FP8 is not None and kv_dtype == FP8
    if fp8 and not info.supports_fp8:
        pytest.skip(f"{info.name} has no fp8")
    config = KVCacheConfig(1, 1, 1, 32, 128, dtype, num_kv_heads=8, kv_dtype=kv_dtype)
    kernel, reference = PagedKVCache(config, 16, num_blocks=80), PagedKVCache(config, 16, num_blocks=80)
    tokens = 1000
    slots = torch.randperm(80 * 16, device="cuda")[:tokens]
    slots[::97] = PAD_SLOT
    key = torch.randn(tokens, 8, 128, device="cuda", dtype=dtype) * 4
    value = torch.randn_like(key)
    paged_write(key, value, kernel.layer(0), slots, backend="triton")
    paged_write_reference(key, value, reference.layer(0), slots)
    got, want = kernel.layer(0), reference.layer(0)
    for a, b in ((got.key_cache, want.key_cache), (got.value_cache, want.value_cache)):
        if fp8:  # both round to nearest even; allow one e4m3 step should the hardware conversion differ
            assert torch.allclose(a.float(), b.float(), rtol=0.125, atol=2**-9)
        else:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    for a_scale, b_scale in ((got.key_scale, want.key_scale), (got.value_scale, want.value_scale)):
        assert (a_scale is None) == (b_scale is None)
        if a_scale is not None and b_scale is not None:
            assert torch.equal(a_scale, b_scale)


def test_paged_write_is_captured_and_replayed() -> None:
    graphs = pytest.importorskip("llamatelemetry_graphs")
    from llamatelemetry_kvcache import PagedKVCache, paged_write_reference

    config = KVCacheConfig(1, 1, 2, 8, 64, torch.float16, num_kv_heads=2, kv_dtype=torch.int8)
    cache, reference = PagedKVCache(config, 16, num_blocks=8), PagedKVCache(config, 16, num_blocks=8)
    keys = torch.zeros(4, 2, 64, device="cuda", dtype=torch.float16)
    values = torch.zeros_like(keys)
    slots = torch.zeros(4, dtype=torch.long, device="cuda")

    def write_step(step_keys: torch.Tensor, step_values: torch.Tensor, step_slots: torch.Tensor) -> torch.Tensor:
        # capture_graph calls fn(*inputs): the static inputs, which replay() copies new values into.
        for layer in range(2):
            cache.write(layer, step_keys, step_values, step_slots)
        return cache.layer(1).key_scale  # type: ignore[return-value]

    graph = graphs.capture_graph(write_step, inputs=[keys, values, slots])
    for layer in range(2):  # what warm-up and capture wrote: zeros at slot 0
        paged_write_reference(keys, values, reference.layer(layer), slots)
    for step in range(3):
        new_k, new_v = torch.randn_like(keys), torch.randn_like(values)
        new_slots = torch.randperm(8 * 16, device="cuda")[:4]
        graph.replay(new_k, new_v, new_slots)
        for layer in range(2):
            paged_write_reference(new_k, new_v, reference.layer(layer), new_slots)
            got, want = cache.layer(layer), reference.layer(layer)
            assert torch.equal(got.key_cache, want.key_cache) and torch.equal(got.value_cache, want.value_cache)
            assert torch.equal(got.key_scale, want.key_scale), step  # type: ignore[arg-type]
