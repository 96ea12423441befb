"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over packed tokens.

Parameter names match transformers' ``LlamaForCausalLM`` (``model.layers.N.self_attn.q_proj.weight``, ...), so a
transformers state dict loads as it is. A step's tokens of every sequence are packed into one ``[tokens]``
vector with their positions; attention finds each sequence's keys through the step context. Each layer is
``h = h + attn(norm(h)); h = h + mlp(norm(h))``, with the residual add fused into the next norm when the Triton
kernels are on; for steps of a few tokens (decode) with merged projections, the add and norm are fused into the
merged q/k/v and gate/up projections (SwiGLU too, into the latter), and the o and down projections take the same
few-row linear kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from llamatelemetry_engine.config import ModelConfig
from llamatelemetry_engine.context import StepContext
from llamatelemetry_engine.layers import Attention, RMSNorm, RotaryEmbedding, SwiGLUMLP
from llamatelemetry_triton import triton_fused_add_rmsnorm_linear, triton_rmsnorm_linear
from llamatelemetry_triton.heuristics import LINEAR_MAX_ROWS

__all__ = ["DecoderLayer", "LlamaForCausalLM", "LlamaModel"]


class DecoderLayer(nn.Module):
    """One pre-norm transformer block."""

    def __init__(
        self, config: ModelConfig, layer_idx: int, rotary: RotaryEmbedding, *, fused: bool, flash: bool
    ) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx, rotary, flash=flash)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, bias=config.mlp_bias, fused=fused)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused=fused)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused=fused)
        self.fused = fused

    def forward(
        self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._few_rows(h):
            return self._forward_few_rows(positions, h, residual, ctx)
        if residual is None:
            residual = h
            x = self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, x, ctx)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual

    def _few_rows(self, h: torch.Tensor) -> bool:
        """Whether this step takes the few-row path: Triton kernels on, projections merged, and at most
        ``LINEAR_MAX_ROWS`` tokens (decode at small batch; a CUDA graph is captured per batch size, so the choice
        is fixed per graph)."""
        return (
            self.fused
            and h.shape[0] <= LINEAR_MAX_ROWS
            and self.self_attn.qkv_proj is not None
            and self.mlp.gate_up_proj is not None
        )

    def _forward_few_rows(
        self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Each norm runs inside the projection after it (one launch instead of two; the normalized rows never
        # reach memory), SwiGLU inside the gate/up projection; o_proj and down_proj take the few-row kernel too.
        # Same roundings as the unfused path.
        qkv_proj, gate_up_proj = self.self_attn.qkv_proj, self.mlp.gate_up_proj
        assert qkv_proj is not None and gate_up_proj is not None
        norm = self.input_layernorm
        if residual is None:
            residual = h
            qkv = triton_rmsnorm_linear(h, norm.weight, qkv_proj.weight, qkv_proj.bias, norm.eps)
        else:
            qkv, residual = triton_fused_add_rmsnorm_linear(
                h, residual, norm.weight, qkv_proj.weight, qkv_proj.bias, norm.eps
            )
        h = self.self_attn.forward_projected(positions, qkv, ctx)
        norm = self.post_attention_layernorm
        act, residual = triton_fused_add_rmsnorm_linear(
            h, residual, norm.weight, gate_up_proj.weight, gate_up_proj.bias, norm.eps, swiglu=True
        )
        return self.mlp.forward_activated(act), residual


class LlamaModel(nn.Module):
    """Embedding, the decoder layers and the final norm: ``[tokens]`` ids to ``[tokens, hidden]`` states."""

    def __init__(self, config: ModelConfig, max_positions: int, *, fused: bool = False, flash: bool = False) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config, max_positions, fused=fused)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, self.rotary_emb, fused=fused, flash=flash) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, fused=fused)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            h, residual = layer(positions, h, residual, ctx)
        out, _ = self.norm(h, residual)
        return out  # type: ignore[no-any-return]


class LlamaForCausalLM(nn.Module):
    """The decoder and its output projection (tied to the embedding when the config says so)."""

    def __init__(self, config: ModelConfig, max_positions: int, *, fused: bool = False, flash: bool = False) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_positions, fused=fused, flash=flash)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Hidden states ``[tokens, hidden]`` after the final norm (call :meth:`logits` on the rows needed)."""
        return self.model(input_ids, positions, ctx)  # type: ignore[no-any-return]

    def merge_projections(self) -> None:
        """Merge each layer's q/k/v and gate/up projections into one matmul each (after the weights are loaded:
        state-dict names stay transformers')."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.merge_projections()
            layer.mlp.merge_projections()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[rows, vocab]`` logits of ``hidden`` rows, in the model dtype."""
        return self.lm_head(hidden)  # type: ignore[no-any-return]
