from __future__ import annotations

from typing import Any

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_engine import PRESETS, ModelConfig, RopeScaling
from llamatelemetry_engine.layers import inverse_frequencies


def _llama(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
        "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
    }  # fmt: skip
    raw.update(changes)
    return raw


def test_reads_the_llama_family_switches() -> None:
    qwen = ModelConfig.from_hf(_llama(model_type="qwen2"))
    assert qwen.qkv_bias and not qwen.o_bias
    mistral = ModelConfig.from_hf(_llama(model_type="mistral", sliding_window=4096))
    assert mistral.sliding_window == 4096
    llama = ModelConfig.from_hf(_llama(attention_bias=True, tie_word_embeddings=True, eos_token_id=[5, 6]))
    assert llama.qkv_bias and llama.o_bias and llama.tie_word_embeddings and llama.eos_token_ids == (5, 6)
    assert llama.head_dim == 8 and llama.kv_size == 16


def test_rope_scaling_in_both_spellings() -> None:
    old = ModelConfig.from_hf(_llama(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0}))
    new = ModelConfig.from_hf(_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}))
    assert old.rope_scaling == new.rope_scaling == RopeScaling("linear", 2.0)
    assert old.rope_theta == new.rope_theta == 5e5


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_llama(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'"),
        (_llama(num_key_value_heads=3), "divisible by num_kv_heads"),
        (_llama(rope_scaling={"type": "yarn", "factor": 4.0}), "rope scaling type"),
        (_llama(hidden_act="gelu"), "hidden_act"),
        (_llama(model_type="qwen2", use_sliding_window=True), "use_sliding_window"),
    ],
)
def test_unsupported_configurations_are_refused(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ModelConfig.from_hf(raw)


def test_presets_have_the_published_sizes() -> None:
    assert PRESETS["smollm2-135m"].num_parameters() == pytest.approx(134.5e6, rel=0.01)
    assert PRESETS["llama-3.2-1b"].num_parameters() == pytest.approx(1.236e9, rel=0.01)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
    ],
)  # fmt: skip
def test_rotary_frequencies_match_transformers(rope: dict[str, Any]) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    raw = _llama(head_dim=64, hidden_size=512, rope_parameters={**rope, "rope_theta": 500000.0})
    ours = inverse_frequencies(ModelConfig.from_hf(raw))
    hf_config = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    if rope["rope_type"] == "default":
        expected = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, "cpu")
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
