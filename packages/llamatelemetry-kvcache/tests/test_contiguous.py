"""KVCache: in-place writes per step, ragged batches, explicit positions, errors, the graph-safe path."""

from __future__ import annotations

import pytest
import torch

from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.testing import assert_close
from llamatelemetry_kvcache import KVCache, KVCacheConfig

LAYERS, HEADS, KV_HEADS, DIM = 3, 4, 2, 8


def _cache(batch: int = 3, seq: int = 20, dtype: torch.dtype = torch.float32, **kw: object) -> KVCache:
    return KVCache(KVCacheConfig(batch, seq, LAYERS, HEADS, DIM, dtype, num_kv_heads=KV_HEADS, device="cpu", **kw))  # type: ignore[arg-type]


def _kv(batch: int, tokens: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, tokens, KV_HEADS, DIM).to(dtype), torch.randn(batch, tokens, KV_HEADS, DIM).to(dtype)


def _step(cache: KVCache, batch: int, tokens: int, **kw: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    written = []
    for layer in range(LAYERS):
        k, v = _kv(batch, tokens, cache.config.dtype)
        cache.update(layer, k, v, **kw)  # type: ignore[arg-type]
        written.append((k, v))
    return written


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_steps_accumulate_exactly_what_was_written(dtype: torch.dtype) -> None:
    cache = _cache(dtype=dtype)
    assert cache.get(0) is None
    history = [_step(cache, 2, 5), _step(cache, 2, 1), _step(cache, 2, 3)]
    assert cache.lengths[:2] == [9, 9] and cache.lengths[2] == 0
    for layer in range(LAYERS):
        cached = cache.get(layer)
        assert cached is not None
        k, v = cached
        assert k.shape == (2, 9, KV_HEADS, DIM) and k.dtype == dtype
        assert torch.equal(k, torch.cat([h[layer][0] for h in history], dim=1))
        assert torch.equal(v, torch.cat([h[layer][1] for h in history], dim=1))


def test_length_advances_once_per_step_after_the_last_layer() -> None:
    cache = _cache()
    k, v = _kv(1, 4)
    k0, _ = cache.update(0, k, v)
    assert k0.shape == (1, 4, KV_HEADS, DIM) and torch.equal(k0, k)
    assert cache.lengths[0] == 0 and cache.get(0) is None  # the step is not complete yet
    cache.update(1, *_kv(1, 4))
    with pytest.raises(ConfigurationError, match="already written in this step"):
        cache.update(1, *_kv(1, 4))
    cache.update(2, *_kv(1, 4))
    assert cache.lengths[0] == 4
    k1, _ = cache.update(0, *_kv(1, 1))
    assert k1.shape[1] == 5 and torch.equal(k1[:, :4], k)


def test_returned_views_alias_the_storage_and_writes_are_in_place() -> None:
    cache = _cache()
    storage, _ = cache.storage(0)
    before = storage.data_ptr()
    k, _ = cache.update(0, *_kv(3, 2))
    assert k.data_ptr() == storage.data_ptr() == before
    cache.advance()
    assert cache.lengths[:3] == [2, 2, 2]


def test_ragged_new_tokens_and_explicit_positions() -> None:
    cache = _cache()
    prefill = _step(cache, 3, 6, num_new_tokens=[6, 2, 4])
    assert cache.lengths == [6, 2, 4]
    decode = _step(cache, 3, 1)  # each sequence continues at its own length
    assert cache.lengths == [7, 3, 5]
    for layer in range(LAYERS):
        cached = cache.get(layer)
        assert cached is not None
        k, _ = cached
        assert k.shape[1] == 7
        for i, n in enumerate([6, 2, 4]):
            assert torch.equal(k[i, :n], prefill[layer][0][i, :n])
            assert torch.equal(k[i, n], decode[layer][0][i, 0])
            assert torch.isfinite(k[i]).all()  # padding past a short sequence holds finite values
    rewrite = _step(cache, 3, 1, positions=[2, 0, 4])  # roll back and overwrite (speculative decoding)
    assert cache.lengths == [3, 1, 5]
    cached = cache.get(1)
    assert cached is not None
    assert torch.equal(cached[0][1, 0], rewrite[1][0][1, 0])


def test_reset_and_clear() -> None:
    cache = _cache()
    _step(cache, 2, 3)
    cache.reset(1)
    assert cache.lengths[:2] == [3, 0]
    _step(cache, 2, 1, num_new_tokens=[1, 1])
    assert cache.lengths[:2] == [4, 1]
    cache.clear()
    assert cache.get(0) is None and cache.lengths == [0, 0, 0]
    cache.reset(0)
    with pytest.raises(ConfigurationError, match="sequence index"):
        cache.reset(3)


def test_capacity_errors_name_the_numbers_and_change_nothing() -> None:
    cache = _cache(batch=2, seq=8)
    with pytest.raises(CapacityError, match="max_batch_size=2"):
        cache.update(0, *_kv(3, 1))
    _step(cache, 2, 6)
    with pytest.raises(CapacityError, match=r"9 tokens \(6 cached \+ 3 new\).*max_seq_length=8"):
        cache.update(0, *_kv(2, 3))
    assert cache.lengths == [6, 6]
    _step(cache, 2, 2)
    assert cache.lengths == [8, 8]


def test_bad_inputs_say_expected_and_got() -> None:
    cache = _cache()
    k, v = _kv(1, 2)
    with pytest.raises(ConfigurationError, match=r"num_kv_heads=2, head_dim=8\], got \[1, 2, 4, 8\]"):
        cache.update(0, torch.randn(1, 2, 4, 8), v)
    with pytest.raises(ConfigurationError, match=r"dtype float32.*got float16"):
        cache.update(0, k.half(), v)
    with pytest.raises(ConfigurationError, match="one shape"):
        cache.update(0, k, v[:, :1])
    with pytest.raises(ConfigurationError, match=r"layer_idx in \[0, 3\)"):
        cache.update(3, k, v)
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        cache.update(0, k.tolist(), v)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="one int per sequence"):
        cache.update(0, k, v, positions=[0, 1])
    with pytest.raises(ConfigurationError, match="between 1 and 2 new tokens"):
        cache.update(0, k, v, num_new_tokens=[3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int8_storage_round_trips_within_half_a_step(dtype: torch.dtype) -> None:
    cache = _cache(dtype=dtype, kv_dtype=torch.int8)
    history = [_step(cache, 3, 4), _step(cache, 3, 1)]
    storage, _ = cache.storage(1)
    scales = cache.scales(1)
    assert storage.dtype == torch.int8 and scales is not None and scales[0].dtype == torch.float32
    cached = cache.get(1)
    assert cached is not None
    k, v = cached
    want_k = torch.cat([h[1][0] for h in history], dim=1).float()
    step = want_k.abs().amax(-1, keepdim=True) / 127
    assert k.dtype == dtype
    assert ((k.float() - want_k).abs() <= step / 2 + 1e-3 * want_k.abs() + 1e-6).all()
    want_v = torch.cat([h[1][1] for h in history], dim=1).float()
    assert_close(v.float(), want_v, atol=0.05, rtol=0.02)


def test_graph_safe_path_writes_at_device_positions_without_touching_host_lengths() -> None:
    cache = _cache(batch=2, seq=10)
    _step(cache, 2, 3, num_new_tokens=[3, 1])
    positions = torch.tensor([3, 1])
    written = []
    for layer in range(LAYERS):
        k, v = _kv(2, 1)
        kf, _ = cache.update(layer, k, v, positions=positions)
        assert kf.shape == (2, 10, KV_HEADS, DIM)  # fixed shapes and addresses: the whole storage
        assert kf.data_ptr() == cache.storage(layer)[0].data_ptr()
        assert torch.isfinite(kf).all()
        written.append((k, v))
    assert cache.lengths[:2] == [3, 1]
    cache.set_lengths(positions + 1)
    assert cache.lengths[:2] == [4, 2]
    for layer in range(LAYERS):
        cached = cache.get(layer)
        assert cached is not None
        assert torch.equal(cached[0][0, 3], written[layer][0][0, 0])
        assert torch.equal(cached[1][1, 1], written[layer][1][1, 0])


def test_graph_safe_path_quantizes_too() -> None:
    cache = _cache(batch=2, seq=6, kv_dtype=torch.int8)
    k, v = _kv(2, 1)
    kf, _ = cache.update(0, k, v, positions=torch.tensor([0, 5], dtype=torch.int32))
    assert kf.shape == (2, 6, KV_HEADS, DIM)
    assert_close(kf[0, 0], k[0, 0], atol=k.abs().max().item() / 127, rtol=0)
    assert_close(kf[1, 5], k[1, 0], atol=k.abs().max().item() / 127, rtol=0)
    with pytest.raises(ConfigurationError, match=r"shape \[2\]"):
        cache.update(0, k, v, positions=torch.tensor([0]))


def test_a_shorter_row_never_shows_uninitialised_storage() -> None:
    cache = _cache(batch=2, seq=64)
    for layer in range(LAYERS):  # the operating system may hand out dirty memory
        for t in cache.storage(layer):
            t.fill_(float("nan"))
    _step(cache, 2, 3)
    _step(cache, 1, 30)  # only row 0 grows; get() reads row 1 up to row 0's length
    keys, values = cache.get(0)  # type: ignore[misc]
    assert keys.shape[:2] == (2, 33) and not bool(keys.isnan().any()) and not bool(values.isnan().any())
    assert bool((keys[1, 3:] == 0).all())
    cache.set_lengths([40])
    keys, _ = cache.get(0)  # type: ignore[misc]
    assert keys.shape[1] == 40 and not bool(keys.isnan().any())


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_quantized_heads_that_are_not_finite_read_back_as_nan(kv_dtype: torch.dtype) -> None:
    cache = _cache(batch=2, seq=4, dtype=torch.float16, kv_dtype=kv_dtype)
    k, v = _kv(2, 1, torch.float16)
    k[0, 0, 0, 0] = float("nan")  # came back as rounded finite values (scale 1)
    k[0, 0, 1] = float("-inf")  # read back as NaN only if the undefined cast of NaN to int8 gave 0
    got, _ = cache.update(0, k, v)
    assert bool(got[0, 0].isnan().all()), f"heads that are not finite must read back as NaN, got {got[0, 0]}"
    assert not bool(got[1].isnan().any())


def test_graph_safe_positions_out_of_range_raise_before_writing() -> None:
    cache = _cache(batch=2, seq=8)
    k, v = _kv(2, 2)
    before = cache.storage(0)[0].clone()
    with pytest.raises(ConfigurationError, match="positions >= 0"):
        cache.update(0, k, v, positions=torch.tensor([-1, 0]))
    with pytest.raises(CapacityError, match="max_seq_length=8"):
        cache.update(0, k, v, positions=torch.tensor([7, 0]))
    assert torch.equal(cache.storage(0)[0].nan_to_num(), before.nan_to_num())


def test_set_lengths_checks_every_value_before_setting_any() -> None:
    cache = _cache(batch=3, seq=8)
    _step(cache, 3, 2)
    for bad in ([0, -1], [1.5], ["3"], None, 3):
        with pytest.raises((ConfigurationError, CapacityError), match="length"):
            cache.set_lengths(bad)  # type: ignore[arg-type]
        assert cache.lengths == [2, 2, 2]
    with pytest.raises(ConfigurationError, match="batch"):
        cache.prepare_static(4)
