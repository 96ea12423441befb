"""transformers interop: generate with a KVCache-backed cache gives exactly the default cache's greedy tokens."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_kvcache import KVCache, KVCacheConfig

transformers = pytest.importorskip("transformers")

from llamatelemetry_kvcache.hf import TransformersKVCache  # noqa: E402


def _model() -> Any:
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _cache(model: Any, batch: int, **kw: object) -> TransformersKVCache:
    config = model.config
    kv = KVCache(
        KVCacheConfig(
            batch,
            64,
            config.num_hidden_layers,
            config.num_attention_heads,
            config.hidden_size // config.num_attention_heads,
            torch.float32,
            num_kv_heads=config.num_key_value_heads,
            device="cpu",
            **kw,  # type: ignore[arg-type]
        )
    )
    return TransformersKVCache(kv)


def _generate(model: Any, cache: object | None, **inputs: torch.Tensor) -> torch.Tensor:
    # min_new_tokens: a random model may emit its EOS token early; every run then has the same length.
    kwargs: dict[str, object] = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    if cache is not None:
        kwargs["past_key_values"] = cache
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        out: torch.Tensor = model.generate(**inputs, **kwargs)
    return out


@torch.no_grad()
def test_greedy_generate_matches_the_default_cache() -> None:
    model = _model()
    input_ids = torch.randint(1, 97, (2, 7))
    expected = _generate(model, None, input_ids=input_ids)
    cache = _cache(model, batch=2)
    got = _generate(model, cache, input_ids=input_ids)
    assert torch.equal(got, expected), (got, expected)
    assert cache.kv_cache.lengths == [7 + 11, 7 + 11]  # the last generated token is never fed back
    assert cache.get_seq_length() == 18


@torch.no_grad()
def test_left_padded_batch_matches_too() -> None:
    model = _model()
    input_ids = torch.randint(1, 97, (2, 6))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :2] = 0
    attention_mask[1, :2] = 0
    expected = _generate(model, None, input_ids=input_ids, attention_mask=attention_mask)
    got = _generate(model, _cache(model, batch=3), input_ids=input_ids, attention_mask=attention_mask)
    assert torch.equal(got, expected)


@torch.no_grad()
def test_int8_cache_generates_and_reports_its_error() -> None:
    model = _model()
    input_ids = torch.randint(1, 97, (1, 9))
    cache = _cache(model, batch=1, kv_dtype=torch.int8)
    out = _generate(model, cache, input_ids=input_ids)
    assert out.shape == (1, 21)
    # Attention over int8 K/V against fp32 K/V: the logits of one forward differ by the quantization only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
        logits_fp = model(input_ids, past_key_values=_cache(model, batch=1)).logits
        int8 = _cache(model, batch=1, kv_dtype=torch.int8)
        logits_q = model(input_ids, past_key_values=int8).logits
    err = (logits_q - logits_fp).abs().max().item()
    assert err < 0.05 * logits_fp.abs().max().item()


def test_wrong_cache_and_too_many_layers() -> None:
    with pytest.raises(TypeError, match="KVCache"):
        TransformersKVCache(object())  # type: ignore[arg-type]
    model = _model()
    cache = _cache(model, batch=1)
    with pytest.raises(ConfigurationError, match="num_layers=3"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 3)


@torch.no_grad()
def test_paged_cache_generates_the_default_cache_tokens() -> None:
    from llamatelemetry_kvcache import PagedKVCache
    from llamatelemetry_kvcache.hf import TransformersPagedKVCache

    model = _model()
    config = model.config
    kv = KVCacheConfig(2, 64, 3, 4, 16, torch.float32, num_kv_heads=config.num_key_value_heads, device="cpu")
    input_ids = torch.randint(1, 97, (2, 7))
    expected = _generate(model, None, input_ids=input_ids)
    cache = TransformersPagedKVCache(PagedKVCache(kv, page_size=4))
    got = _generate(model, cache, input_ids=input_ids)
    assert torch.equal(got, expected), (got, expected)
    assert cache.paged_cache.block_manager.num_tokens(1) == 18
    with pytest.raises(ConfigurationError, match="not supported"):
        cache.reorder_cache(torch.tensor([1, 0]))  # type: ignore[arg-type,unused-ignore]
