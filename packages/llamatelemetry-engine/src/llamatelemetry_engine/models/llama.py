"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over packed tokens.

Parameter names match transformers' ``LlamaForCausalLM`` (``model.layers.N.self_attn.q_proj.weight``, ...), so a
transformers state dict loads as it is. A step's tokens of every sequence are packed into one ``[tokens]``
vector with their positions; attention finds each sequence's keys through the step context. Each layer is
``h = h + attn(norm(h)); h = h + mlp(norm(h))``, with the residual add fused into the next norm when the Triton
kernels are on; in one-token steps (batch-1 decode) with merged projections, the add and norm before attention are
fused into the merged q/k/v projection, and the q/k/v, o and down projections take the few-row linear kernel of
``llamatelemetry-triton`` instead of cuBLAS (see :data:`FEW_ROW_TOKENS`).
"""

from __future__ import annotations

import torch
from torch import nn

from llamatelemetry_engine.config import ModelConfig
from llamatelemetry_engine.context import StepContext
from llamatelemetry_engine.layers import Attention, RMSNorm, RotaryEmbedding, SwiGLUMLP
from llamatelemetry_triton import triton_fused_add_rmsnorm_linear, triton_rmsnorm_linear, triton_swiglu

__all__ = ["FEW_ROW_TOKENS", "DecoderLayer", "LlamaForCausalLM", "LlamaModel"]

FEW_ROW_TOKENS = 1
"""Steps of at most this many tokens take the few-row linear kernel for the q/k/v (with the norm fused in), o
and down projections. Measured on an H200 at Llama-3.2-1B's shapes (``benchmarks/triton/sweep_gemv.py``,
fp16, graph-replayed, 16 layers): at one row the kernel beat cuBLAS for q/k/v with the norm (7.5 against
8.6 us), o (5.1 against 6.6) and down (13.5 against 14.2), and lost for gate/up (19.7 against 18.6, 24.3 against
23.6 with SwiGLU fused), which stays on cuBLAS; at four rows it lost everywhere (0.53x to 0.92x)."""


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
        :data:`FEW_ROW_TOKENS` tokens (batch-1 decode; a CUDA graph is captured per batch size, so the choice is
        fixed per graph)."""
        return (
            self.fused
            and h.shape[0] <= FEW_ROW_TOKENS
            and self.self_attn.qkv_proj is not None
            and self.mlp.gate_up_proj is not None
        )

    def _forward_few_rows(
        self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The norm before attention runs inside the q/k/v projection (one launch instead of two; the normalized
        # row never reaches memory); o_proj and down_proj take the few-row kernel too; gate/up stays on cuBLAS
        # (FEW_ROW_TOKENS says why). Same roundings as the unfused path.
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
        x, residual = self.post_attention_layernorm(h, residual)
        gate, up = gate_up_proj(x).chunk(2, dim=-1)
        return self.mlp.forward_activated(triton_swiglu(gate, up)), residual


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
