"""The SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``.

The plain path is PyTorch's ``silu`` and a multiply in the model dtype (transformers' formula); the fused path
is ``llamatelemetry-triton``'s SwiGLU kernel (one pass, fp32 inside). :meth:`SwiGLUMLP.merge_projections` computes
gate and up with one matmul over their concatenated weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamatelemetry_engine.layers.attention import merged_linear
from llamatelemetry_triton import triton_linear, triton_swiglu

__all__ = ["SwiGLUMLP"]


class SwiGLUMLP(nn.Module):
    """``[..., hidden] -> [..., hidden]`` through an ``intermediate``-wide gated layer."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool = False, fused: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.fused = fused
        self.gate_up_proj: nn.Linear | None = None

    def merge_projections(self) -> None:
        """Compute gate and up with one matmul (weights concatenated; the separate ones are freed)."""
        self.gate_up_proj = merged_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor, *, few_rows: bool = False) -> torch.Tensor:
        """``few_rows`` (with merged projections): gate/up with SwiGLU fused in, then down, through
        ``llamatelemetry-triton``'s ``triton_linear`` (its few-row or small-M kernel) instead of ``nn.Linear``."""
        if few_rows and self.gate_up_proj is not None:
            act = triton_linear(x, self.gate_up_proj.weight, self.gate_up_proj.bias, swiglu=True)
            return triton_linear(act, self.down_proj.weight, self.down_proj.bias)
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = triton_swiglu(gate, up) if self.fused else F.silu(gate) * up
        return self.down_proj(act)  # type: ignore[no-any-return]
