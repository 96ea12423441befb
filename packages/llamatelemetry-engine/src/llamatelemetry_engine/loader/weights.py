"""What every loader returns, and the check that a state dict is complete for a configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from llamatelemetry_engine.config import ModelConfig
from llamatelemetry_engine.errors import ModelLoadError

__all__ = ["LoadedModel", "check_state_dict", "expected_shapes"]


@dataclass
class LoadedModel:
    """A configuration, its weights (transformers names), and the tokenizer when the source has one."""

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    source: str
    tokenizer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``config``'s model by transformers name, with its shape."""
    h, i = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, out in (("q", config.q_size), ("k", config.kv_size), ("v", config.kv_size)):
            shapes[p + f"self_attn.{name}_proj.weight"] = (out, h)
            if config.qkv_bias:
                shapes[p + f"self_attn.{name}_proj.bias"] = (out,)
        shapes[p + "self_attn.o_proj.weight"] = (h, config.q_size)
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        if config.mlp_bias:
            shapes[p + "mlp.gate_proj.bias"] = (i,)
            shapes[p + "mlp.up_proj.bias"] = (i,)
            shapes[p + "mlp.down_proj.bias"] = (h,)
    return shapes


def check_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`ModelLoadError` naming missing tensors and wrong shapes (extra tensors are ignored)."""
    shapes = expected_shapes(config)
    missing = [k for k in shapes if k not in state_dict]
    if missing:
        raise ModelLoadError(
            f"{source}: {len(missing)} weight tensors missing for a {config.model_type} of {config.num_layers} "
            f"layers, e.g. {missing[:3]}; the file is incomplete or of another architecture"
        )
    wrong = [(k, tuple(state_dict[k].shape), s) for k, s in shapes.items() if tuple(state_dict[k].shape) != s]
    if wrong:
        k, got, want = wrong[0]
        raise ModelLoadError(f"{source}: {k} has shape {list(got)}, the configuration needs {list(want)}")
