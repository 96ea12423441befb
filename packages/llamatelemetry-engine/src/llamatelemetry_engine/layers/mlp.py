"""The SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``.

The plain path is PyTorch's ``silu`` and a multiply in the model dtype (transformers' formula); the fused path
is ``llamatelemetry-triton``'s SwiGLU kernel (one pass, fp32 inside).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamatelemetry_triton import triton_swiglu

__all__ = ["SwiGLUMLP"]


class SwiGLUMLP(nn.Module):
    """``[..., hidden] -> [..., hidden]`` through an ``intermediate``-wide gated layer."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool = False, fused: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        act = triton_swiglu(gate, up) if self.fused else F.silu(gate) * up
        return self.down_proj(act)  # type: ignore[no-any-return]
