"""enable_flash_attention: transformers decoders and nn.MultiheadAttention give the same outputs, through our op."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_core.selection import record_selections
from llamatelemetry_flashattn import (
    FlashAttentionConfig,
    disable_flash_attention,
    enable_flash_attention,
)

# fp32 on CPU: the outputs of two exact attention paths differ by reduction order only.
ATOL, RTOL = 2e-5, 2e-5


def _cpu_backend() -> str:
    return "triton" if triton_interpreter_enabled() else "sdpa_cpu"


# --- nn.MultiheadAttention ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_multihead_attention_matches(batch_first: bool, causal: bool, rng: torch.Generator) -> None:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=batch_first).eval()
    x = torch.randn(2, 19, 64, generator=rng)
    if not batch_first:
        x = x.transpose(0, 1)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(19) if causal else None
    with torch.no_grad():
        expected, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
        assert enable_flash_attention(mha) is mha
        with record_selections() as record:
            got, weights = mha(x, x, x, attn_mask=mask, need_weights=False)
    assert weights is None
    assert record.last("flash_attention") == _cpu_backend()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_multihead_attention_cross_attention_and_unbatched(rng: torch.Generator) -> None:
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=True).eval()
    q = torch.randn(3, 7, 32, generator=rng)
    kv = torch.randn(3, 11, 32, generator=rng)
    with torch.no_grad():
        expected = mha(q, kv, kv, need_weights=False)[0]
        expected_single = mha(q[0], kv[0], kv[0], need_weights=False)[0]
        enable_flash_attention(mha)
        torch.testing.assert_close(mha(q, kv, kv, need_weights=False)[0], expected, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(
            mha(q[0], kv[0], kv[0], need_weights=False)[0], expected_single, atol=ATOL, rtol=RTOL
        )


def test_multihead_attention_keeps_what_it_cannot_express(rng: torch.Generator) -> None:
    layer = torch.nn.TransformerEncoderLayer(32, 2, dim_feedforward=64, batch_first=True).eval()
    x = torch.randn(2, 9, 32, generator=rng)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    with torch.no_grad():
        expected = layer(x, src_key_padding_mask=padding)
        expected_weights = layer.self_attn(x, x, x, need_weights=True)[1]
        enable_flash_attention(layer)
        with record_selections() as record:
            got = layer(x, src_key_padding_mask=padding)  # key padding: the original forward runs
            weights = layer.self_attn(x, x, x, need_weights=True)[1]  # weights need the n x n matrix
        assert record.implementations("flash_attention") == []
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
        assert weights is not None
        torch.testing.assert_close(weights, expected_weights)
        with record_selections() as record:
            layer(x)
        assert record.implementations("flash_attention") == [_cpu_backend()]
    disable_flash_attention(layer)
    assert "forward" not in layer.self_attn.__dict__


def test_unpatchable_model_names_its_type() -> None:
    with pytest.raises(CapabilityError, match=r"torch\.nn\.modules\.linear\.Linear"):
        enable_flash_attention(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="FlashAttentionConfig"):
        enable_flash_attention(torch.nn.MultiheadAttention(8, 2), config={"causal": True})  # type: ignore[arg-type]


# --- transformers ------------------------------------------------------------------------------------------------


def _tiny(kind: str) -> Any:
    transformers = pytest.importorskip("transformers")
    common: dict[str, Any] = {
        "vocab_size": 96,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 128,
        "attn_implementation": "eager",
    }
    if kind == "llama":
        config = transformers.LlamaConfig(**common)
        model_cls = transformers.LlamaForCausalLM
    elif kind == "mistral":
        config = transformers.MistralConfig(**common, sliding_window=8)
        model_cls = transformers.MistralForCausalLM
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=False)
        model_cls = transformers.Qwen2ForCausalLM
    elif kind == "gemma2":
        config = transformers.Gemma2Config(
            **common,
            sliding_window=8,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=None,
            query_pre_attn_scalar=16,
        )
        model_cls = transformers.Gemma2ForCausalLM
    else:  # pragma: no cover
        raise AssertionError(kind)
    torch.manual_seed(1234)
    return model_cls(config).eval()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma2"])
def test_transformers_logits_are_unchanged(kind: str, rng: torch.Generator) -> None:
    model = _tiny(kind)
    hf_config: Any = model.config
    ids = torch.randint(0, 96, (2, 21), generator=rng)
    with torch.no_grad():
        expected = model(ids).logits
        # Softcapped logits (Gemma 2) have no SDPA kernel: on CPU, ask for the path that has them, not a fallback.
        backend = ("triton" if triton_interpreter_enabled() else "reference") if kind == "gemma2" else None
        patched = enable_flash_attention(model, FlashAttentionConfig(backend=backend))
        assert patched is model
        assert hf_config._attn_implementation == "llamatelemetry"
        with record_selections() as record:
            got = model(ids).logits
    ran = record.implementations("flash_attention")
    assert len(ran) == hf_config.num_hidden_layers
    assert set(ran) <= {_cpu_backend(), "reference"}
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_transformers_with_left_padding_and_cache(rng: torch.Generator) -> None:
    model = _tiny("llama")
    ids = torch.randint(0, 96, (2, 12), generator=rng)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # the second prompt is 8 tokens, left-padded
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        enable_flash_attention(model)
        got = model(ids, attention_mask=mask).logits
        # Padding positions produce whatever each path produces there; the real tokens must agree.
        torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got[1, 4:], expected[1, 4:], atol=1e-4, rtol=1e-4)

        # Decode steps with a cache (q_len 1 against a growing kv) follow the eager model token for token.
        disable_flash_attention(model)
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        enable_flash_attention(model)
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours, eager)


@pytest.mark.parametrize("padding", ["right", "both_sides", "mixed"])
def test_transformers_with_right_padding(padding: str, rng: torch.Generator) -> None:
    model = _tiny("llama")
    ids = torch.randint(0, 96, (3, 12), generator=rng)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # 7 tokens, right-padded
    if padding == "both_sides":
        mask[2, :2] = 0
        mask[2, 9:] = 0
    elif padding == "mixed":
        mask[2, :3] = 0  # left-padded beside a right-padded row
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        enable_flash_attention(model)
        got = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    # Rows after the last real token see every real key under a causal mask: they match SDPA's output too.
    torch.testing.assert_close(got[1, 7:], expected[1, 7:], atol=1e-4, rtol=1e-4)


def test_transformers_window_in_config_narrows_attention(rng: torch.Generator) -> None:
    model = _tiny("llama")
    ids = torch.randint(0, 96, (1, 20), generator=rng)
    with torch.no_grad():
        full = model(ids).logits
        enable_flash_attention(model, FlashAttentionConfig(window_size=(3, 0), backend="reference"))
        windowed = model(ids).logits
    torch.testing.assert_close(windowed[:, :4], full[:, :4], atol=1e-4, rtol=1e-4)  # within the window: same
    assert not torch.allclose(windowed[:, 10:], full[:, 10:], atol=1e-3)


def test_transformers_rejects_a_mask_it_cannot_compute() -> None:
    from llamatelemetry_flashattn.patching import _hf_attention

    module = torch.nn.Module()
    module.is_causal = True  # type: ignore[assignment]
    q = torch.randn(1, 2, 6, 8)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    mask[0, 0, 4, 1] = False  # a hole in the middle of a row
    with pytest.raises(ConfigurationError, match=r"contiguous|neither"):
        _hf_attention(module, q, q, q, mask)


def test_transformers_causal_false_is_refused_for_a_decoder() -> None:
    model = _tiny("llama")
    with pytest.raises(ConfigurationError, match="causal"):
        enable_flash_attention(model, FlashAttentionConfig(causal=False))
