"""RMSNorm, alone or fused with the residual add before it.

``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension. The plain path is transformers' Llama
formula in PyTorch (normalize in fp32, cast back, then scale by the weight in the model dtype), so with every
optimization off the engine computes exactly what transformers computes. The fused path is the Triton kernel of
``llamatelemetry-triton`` (one pass over the row for ``h = x + residual`` and its norm), which on a machine
without Triton runs that package's fp32 reference.
"""

from __future__ import annotations

import torch
from torch import nn

from llamatelemetry_triton import triton_fused_add_rmsnorm, triton_rmsnorm

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """RMSNorm over ``[..., hidden]``; with ``residual``, returns ``(norm(x + residual), x + residual)``."""

    def __init__(self, hidden_size: int, eps: float, *, fused: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fused = fused

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            if residual is None:
                return triton_rmsnorm(x, self.weight, self.eps)
            return triton_fused_add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._plain(x)
        h = residual + x
        return self._plain(h), h
