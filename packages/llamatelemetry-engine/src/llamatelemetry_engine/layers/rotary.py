"""Rotary position embedding with the model's frequency scaling (none, ``linear``, ``llama3``).

Frequencies follow transformers' Llama code: ``inv_freq[i] = theta ** (-2i / d)`` in fp32, divided by the
factor (``linear``) or by a wavelength-dependent blend of 1 and the factor (``llama3``: long wavelengths scaled,
short ones kept, a smooth ramp between). The angle of position ``p`` is ``p * inv_freq`` in fp32; the tables
hold its cosine and sine, ``[max_positions, head_dim / 2]``. The plain path rotates halves (``rotate_half``) in
the model dtype as transformers does; the fused path is ``llamatelemetry-triton``'s in-place RoPE kernel.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llamatelemetry_engine.config import ModelConfig
from llamatelemetry_triton import triton_rope

__all__ = ["RotaryEmbedding", "inverse_frequencies"]


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """The fp32 ``[head_dim / 2]`` rotary frequencies of ``config``, scaling applied."""
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Rotates ``q`` (``[tokens, H, D]``) and ``k`` (``[tokens, H_kv, D]``) by each token's position."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, config: ModelConfig, max_positions: int, *, fused: bool = False) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("cos", torch.empty(max_positions, config.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, config.head_dim // 2), persistent=False)
        self.fused = fused
        if self.cos.device.type != "meta":
            self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the fp32 tables on their device (after ``to_empty`` or a dtype change)."""
        device = self.cos.device
        inv_freq = inverse_frequencies(self.config).to(device)
        positions = torch.arange(self.cos.shape[0], dtype=torch.float32, device=device)
        angles = positions[:, None] * inv_freq[None, :]
        self.cos = angles.cos()
        self.sin = angles.sin()

    @property
    def max_positions(self) -> int:
        """Positions the tables cover."""
        return int(self.cos.shape[0])

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            return triton_rope(q, k, self.cos, self.sin, positions)
        cos = self.cos[positions].repeat(1, 2).unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].repeat(1, 2).unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
