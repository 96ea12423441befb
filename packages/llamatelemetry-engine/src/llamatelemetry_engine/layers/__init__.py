"""Thin ``nn.Module``s over llamatelemetry's operations, each with a plain PyTorch path and a fused one."""

from llamatelemetry_engine.layers.attention import Attention
from llamatelemetry_engine.layers.mlp import SwiGLUMLP
from llamatelemetry_engine.layers.norm import RMSNorm
from llamatelemetry_engine.layers.rotary import RotaryEmbedding, inverse_frequencies

__all__ = ["Attention", "RMSNorm", "RotaryEmbedding", "SwiGLUMLP", "inverse_frequencies"]
