"""Grouped-query self-attention of a Llama-family layer: projections, rotary positions, KV store, attention.

``q``/``k``/``v`` projections (bias on Qwen2), rotary positions applied to ``q`` and ``k``, then the step
context stores the new keys and values and computes attention (see :mod:`llamatelemetry_engine.context`), and
the output projection. Tokens of a step are packed: ``[tokens, hidden]`` in, ``[tokens, hidden]`` out.
"""

from __future__ import annotations

import torch
from torch import nn

from llamatelemetry_engine.config import ModelConfig
from llamatelemetry_engine.context import AttentionParams, StepContext
from llamatelemetry_engine.layers.rotary import RotaryEmbedding

__all__ = ["Attention"]


class Attention(nn.Module):
    """Self-attention of layer ``layer_idx``; ``rotary`` is shared by every layer."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, *, flash: bool = False) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, config.q_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, config.kv_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, config.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.q_size, h, bias=config.o_bias)
        self.rotary = [rotary]  # a list, so the shared module is not registered once per layer
        self.params = AttentionParams(scale=config.head_dim**-0.5, window=config.sliding_window, flash=flash)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary[0](positions, q, k)
        out = ctx.attend(self.layer_idx, q, k, v, self.params)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))  # type: ignore[no-any-return]
