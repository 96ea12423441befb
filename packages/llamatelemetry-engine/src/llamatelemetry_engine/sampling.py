"""Sampling parameters and the sampler: greedy, temperature, top-k and top-p on fp32 logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamatelemetry_core.errors import ConfigurationError

__all__ = ["SamplingParams", "sample"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy (argmax); ``top_k == 0`` and ``top_p == 1`` disable them.

    ``max_tokens`` new tokens at most; generation stops earlier at an end-of-sequence token (the model's unless
    ``ignore_eos``) or one of ``stop_token_ids``. ``seed`` makes sampling reproducible.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if type(self.max_tokens) is not int or self.max_tokens < 1:
            raise ConfigurationError(f"expected max_tokens to be an int >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ConfigurationError(f"expected temperature >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigurationError(f"expected top_k >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigurationError(f"expected top_p in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """Whether tokens are picked by argmax."""
        return self.temperature == 0


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> list[int]:
    """One token id per row of ``logits`` (``[rows, vocab]``, any float dtype; computed in fp32)."""
    if params.greedy:
        return [int(t) for t in logits.argmax(dim=-1).tolist()]
    scores = logits.float() / params.temperature
    if params.top_k:
        k = min(params.top_k, scores.shape[-1])
        kth = scores.topk(k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_scores.softmax(dim=-1) >= params.top_p  # keep the token that crosses top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return [int(t) for t in torch.multinomial(probs, 1, generator=generator).squeeze(-1).tolist()]
