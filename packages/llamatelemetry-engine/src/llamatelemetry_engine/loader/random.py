"""Seeded random weights for any configuration (tests, and GPU benchmarks on machines with no network).

Linear weights are drawn from ``N(0, 1/fan_in)`` and embeddings from ``N(0, 1)``, norm weights near 1: the
logits then spread over several units, so greedy decoding has clear winners and two exact implementations agree
token for token (transformers' small init, ``N(0, 0.02)``, makes near-ties that any rounding difference flips).
"""

from __future__ import annotations

import torch

from llamatelemetry_engine.config import ModelConfig
from llamatelemetry_engine.loader.weights import LoadedModel, expected_shapes

__all__ = ["random_weights"]


def random_weights(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Weights for ``config`` from ``seed`` (same seed, same weights, on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(("norm.weight", "layernorm.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            t = torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        state[name] = t.to(dtype)
    return LoadedModel(config, state, source=f"random weights (seed {seed})")
