"""Shared fixtures of the llamatelemetry-engine tests: transformers reference models on the same weights."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest
import torch

from llamatelemetry_engine import LoadedModel, ModelConfig

ReferenceFactory = Callable[[LoadedModel], torch.nn.Module]


@pytest.fixture
def rng() -> torch.Generator:
    """A generator with a fresh seed per test; the seed is printed, so a failing test shows it."""
    seed = secrets.randbits(31)
    print(f"rng seed: {seed}")
    return torch.Generator().manual_seed(seed)


def _hf_model(loaded: LoadedModel) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config: ModelConfig = loaded.config
    raw = config.to_hf()
    cls_name = raw.pop("architectures")[0]
    config_cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[raw.pop("model_type")]
    hf_config = config_cls(**raw)
    hf_config._attn_implementation = "sdpa"
    model = getattr(transformers, cls_name)(hf_config).eval()
    state = dict(loaded.state_dict)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model  # type: ignore[no-any-return]


@pytest.fixture
def hf_reference() -> ReferenceFactory:
    """Build the transformers model of a :class:`LoadedModel` (same weights, fp32, CPU)."""
    return _hf_model


def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` of ``new_tokens`` tokens, end-of-sequence ignored."""
    out = model.generate(  # type: ignore[operator]
        torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    return [int(t) for t in out[0, len(prompt) :].tolist()]


@pytest.fixture
def greedy() -> Callable[[torch.nn.Module, list[int], int], list[int]]:
    """transformers' greedy generation (see :func:`hf_greedy`)."""
    return hf_greedy
