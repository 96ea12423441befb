"""Grouped-query self-attention of a Llama-family layer: projections, rotary positions, KV store, attention.

``q``/``k``/``v`` projections (bias on Qwen2), rotary positions applied to ``q`` and ``k``, then the step
context stores the new keys and values (with the fused kernels and a paged store, rotation and store are one
launch) and computes attention (see :mod:`llamatelemetry_engine.context`), and
the output projection. :meth:`Attention.merge_projections` replaces the three input projections by one matmul
over their concatenated weights (one larger GEMM instead of three small ones: at decode batch sizes the k and v
projections alone are launch-bound). Tokens of a step are packed: ``[tokens, hidden]`` in, ``[tokens, hidden]`` out.
"""

from __future__ import annotations

import torch
from torch import nn

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_engine.config import ModelConfig
from llamatelemetry_engine.context import AttentionParams, StepContext
from llamatelemetry_engine.layers.rotary import RotaryEmbedding
from llamatelemetry_triton import triton_linear

__all__ = ["Attention", "merged_linear"]


def merged_linear(*parts: nn.Linear) -> nn.Linear:
    """One ``nn.Linear`` whose output is the outputs of ``parts`` side by side (same input, same dtype)."""
    first = parts[0]
    weight = torch.cat([p.weight.detach() for p in parts])
    has_bias = first.bias is not None
    merged = nn.Linear(first.in_features, weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(weight)
        if has_bias:
            merged.bias.copy_(torch.cat([p.bias.detach() for p in parts]))
    return merged.requires_grad_(False)


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
        self.qkv_proj: nn.Linear | None = None
        self.rotary = [rotary]  # a list, so the shared module is not registered once per layer
        self.params = AttentionParams(scale=config.head_dim**-0.5, window=config.sliding_window, flash=flash)

    def merge_projections(self) -> None:
        """Compute ``q``, ``k`` and ``v`` with one matmul (weights concatenated; the separate ones are freed)."""
        self.qkv_proj = merged_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        ctx: StepContext,
        *,
        projected: torch.Tensor | None = None,
        few_rows: bool = False,
    ) -> torch.Tensor:
        """Attention of the step's tokens ``x [tokens, hidden]`` (the normalized hidden states). ``projected``: the
        merged q/k/v projection, already computed by the caller (the few-row path fuses the residual add and the
        norm into it); ``x`` then only gives the token count. ``few_rows``: the merged q/k/v projection (when not
        ``projected``) and the output projection through ``llamatelemetry-triton``'s ``triton_linear`` (its few-row
        or small-M kernel) instead of ``nn.Linear``."""
        tokens = x.shape[0]
        if self.qkv_proj is not None:
            q_size = self.num_heads * self.head_dim
            kv_size = self.num_kv_heads * self.head_dim
            qkv: torch.Tensor
            if projected is not None:
                qkv = projected
            elif few_rows:
                qkv = triton_linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
            else:
                qkv = self.qkv_proj(x)
            qf, kf, vf = torch.split(qkv, [q_size, kv_size, kv_size], dim=-1)
            q = qf.view(tokens, self.num_heads, self.head_dim)
            k = kf.view(tokens, self.num_kv_heads, self.head_dim)
            v = vf.view(tokens, self.num_kv_heads, self.head_dim)
        else:
            if projected is not None:
                raise ConfigurationError("a projected q/k/v needs the merged projection: call merge_projections()")
            q = self.q_proj(x).view(tokens, self.num_heads, self.head_dim)
            k = self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        rotary = self.rotary[0]
        # With the fused kernels, a paged store rotates and stores in one launch; elsewhere, two calls.
        stored = rotary.fused and ctx.rotate_and_store(self.layer_idx, positions, q, k, v, rotary.cos, rotary.sin)
        if not stored:
            q, k = rotary(positions, q, k)
        out = ctx.attend(self.layer_idx, q, k, v, self.params, stored=stored)
        out = out.reshape(tokens, self.num_heads * self.head_dim)
        if few_rows:
            return triton_linear(out, self.o_proj.weight, self.o_proj.bias)
        return self.o_proj(out)  # type: ignore[no-any-return]
