"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) over packed tokens.

Parameter names match transformers' ``LlamaForCausalLM`` (``model.layers.N.self_attn.q_proj.weight``, ...), so a
transformers state dict loads as it is. A step's tokens of every sequence are packed into one ``[tokens]``
vector with their positions; attention finds each sequence's keys through the step context. Each layer is
``h = h + attn(norm(h)); h = h + mlp(norm(h))``, with the residual add fused into the next norm when the Triton
kernels are on.

With the Triton kernels on a Hopper GPU (compute capability 9.x, where they were measured; the launch rows of
other GPUs are not), a step of at most :data:`FEW_ROW_TOKENS` tokens (decode at batch 1 and 2) runs each layer's
projections through ``llamatelemetry-triton``'s few-row linear kernels (GEMVs) instead of cuBLAS, with the
residual add and RMSNorm fused into the q/k/v and gate/up projections and SwiGLU into the down projection: four
launches for the layer's matmuls, norms and activation where there were seven (H200, Llama-3.2-1B shape, batch 1:
1,037 decode tokens/s against 889, ``benchmarks/results/nvidia-h200/engine/gemv-in-graph.md``).
Each fused kernel rounds where the unfused composition rounds. Steps of more than ``LINEAR_MAX_ROWS`` and at
most :data:`SMALL_M_TOKENS` tokens (batched decode) there run the projections through
:func:`~llamatelemetry_triton.triton_linear`'s small-M kernel (Tensor Cores, programmatic dependent launch) with
SwiGLU fused into gate/up, the norms as usual: seven launches for a layer's matmuls, norms and activation (with
the zero-fill of the down projection's split counts) where cuBLAS took eight (with its split-K reduction and the
SwiGLU kernel).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from llamatelemetry_engine.config import ModelConfig
from llamatelemetry_engine.context import StepContext
from llamatelemetry_engine.layers import Attention, RMSNorm, RotaryEmbedding, SwiGLUMLP
from llamatelemetry_triton import (
    HAS_TRITON,
    triton_fused_add_rmsnorm_linear,
    triton_rmsnorm_linear,
    triton_swiglu_linear,
)
from llamatelemetry_triton.heuristics import LINEAR_MAX_ROWS, SMALL_M_MAX_ROWS

__all__ = ["FEW_ROW_TOKENS", "SMALL_M_TOKENS", "DecoderLayer", "LlamaForCausalLM", "LlamaModel"]

FEW_ROW_TOKENS = 2
"""Most tokens in a step whose projections run the few-row kernels. Measured inside CUDA graphs on an H200 at
Llama-3.2-1B's shapes with the persistent launches, per layer (``gemv-in-graph.md``): at 1 row the four kernels
took 44.0 us against 55.1 us for the unfused launches, at 2 rows 51.5 against 55.1 (gate/up with the norm 22.3
against 21.2), at 4 rows 106.3 against 55.5. Engine decode at batch 2: 1,912 tokens/s against 1,846 with the path
off at two tokens (three interleaved runs in one process, the same greedy tokens); batch 1 unchanged."""


SMALL_M_TOKENS = SMALL_M_MAX_ROWS
"""Most tokens in a step whose projections run the small-M kernel (steps of more than ``LINEAR_MAX_ROWS`` tokens;
fewer keep cuBLAS, which beat the few-row kernels at 2 and 4 rows). H200, Llama-3.2-1B shape, decode at batch 64:
49,969 tokens/s against 47,598 with cuBLAS in the same process (``benchmarks/engine/ab_small_m.py``), the same greedy
tokens."""


@functools.cache
def _few_row_gpu(index: int) -> bool:
    """Whether CUDA device ``index`` takes the few-row path: Hopper (compute capability 9.x), where its launches
    were swept and beat cuBLAS; the launch rows of other GPUs are unmeasured."""
    return torch.cuda.get_device_capability(index)[0] == 9


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
        self.few_row_tokens = FEW_ROW_TOKENS if fused and HAS_TRITON else 0
        self.small_m_tokens = SMALL_M_TOKENS if fused and HAS_TRITON else 0
        self.few_row_devices: tuple[str, ...] = ("cuda",)  # both paths' kernels are for GPUs (tests add "cpu")

    def _triton_projections(self, h: torch.Tensor) -> bool:
        """What both Triton projection paths need: merged projections, on a device they are for (on a GPU, Hopper,
        where their launches were measured)."""
        return (
            h.device.type in self.few_row_devices
            and (not h.is_cuda or _few_row_gpu(h.get_device()))
            and self.self_attn.qkv_proj is not None
            and self.mlp.gate_up_proj is not None
        )

    def _few_rows(self, h: torch.Tensor) -> bool:
        return 0 < h.shape[0] <= self.few_row_tokens and self._triton_projections(h)

    def _small_m(self, h: torch.Tensor) -> bool:
        # On a GPU only in fp16/bf16: the kernel refuses fp32 (its products would be TF32), and the path's F.linear
        # fallback with the SwiGLU reference would be slower than the usual path.
        return (
            LINEAR_MAX_ROWS < h.shape[0] <= self.small_m_tokens
            and (not h.is_cuda or h.dtype in (torch.float16, torch.bfloat16))
            and self._triton_projections(h)
        )

    def _forward_few_rows(
        self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn, mlp = self.self_attn, self.mlp
        qkv_proj, gate_up_proj = attn.qkv_proj, mlp.gate_up_proj
        assert qkv_proj is not None and gate_up_proj is not None  # checked by _few_rows
        norm, post = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            residual = h
            qkv = triton_rmsnorm_linear(h, norm.weight, qkv_proj.weight, qkv_proj.bias, norm.eps)
        else:
            qkv, residual = triton_fused_add_rmsnorm_linear(
                h, residual, norm.weight, qkv_proj.weight, qkv_proj.bias, norm.eps
            )
        h = attn(positions, h, ctx, projected=qkv, few_rows=True)
        gate_up, residual = triton_fused_add_rmsnorm_linear(
            h, residual, post.weight, gate_up_proj.weight, gate_up_proj.bias, post.eps
        )
        return triton_swiglu_linear(gate_up, mlp.down_proj.weight, mlp.down_proj.bias), residual

    def forward(
        self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._few_rows(h):
            return self._forward_few_rows(positions, h, residual, ctx)
        small_m = self._small_m(h)  # the projections through triton_linear's small-M kernel, SwiGLU fused in
        if residual is None:
            residual = h
            x = self.input_layernorm(h)
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, x, ctx, few_rows=small_m)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x, few_rows=small_m), residual


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
