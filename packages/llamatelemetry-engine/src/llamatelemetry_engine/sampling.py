"""Sampling parameters and the sampler: greedy, temperature, top-k and top-p, on logits of any float dtype (in fp32)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import check_non_negative_int

__all__ = ["SamplingParams", "sample"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy (argmax); ``top_k == 0`` and ``top_p == 1`` disable them.

    ``max_tokens`` new tokens at most; generation stops earlier at an end-of-sequence token (the model's unless
    ``ignore_eos``) or one of ``stop_token_ids`` (one id, or a sequence of them, kept as a tuple). ``seed`` (an int
    in [0, 2**64)) makes sampling reproducible. Raises :class:`ConfigurationError` naming a field out of range or
    of the wrong type.
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
        temperature: object = self.temperature
        if not _real(temperature) or temperature < 0:  # type: ignore[operator]
            raise ConfigurationError(f"expected temperature to be a number >= 0 (0 is greedy), got {temperature!r}")
        check_non_negative_int(self.top_k, "top_k")
        top_p: object = self.top_p
        if not _real(top_p) or not 0 < top_p <= 1:  # type: ignore[operator]
            raise ConfigurationError(f"expected top_p to be a number in (0, 1], got {top_p!r}")
        if self.seed is not None and check_non_negative_int(self.seed, "seed") >= 2**64:
            raise ConfigurationError(
                f"expected seed to be an integer in [0, 2**64) (a torch.Generator's), got {self.seed}"
            )
        ignore_eos: object = self.ignore_eos
        if not isinstance(ignore_eos, bool):
            raise ConfigurationError(f"expected ignore_eos to be True or False, got {ignore_eos!r}")
        stops: object = self.stop_token_ids
        if isinstance(stops, int) and not isinstance(stops, bool):
            stops = (stops,)  # one stop token
        if isinstance(stops, str | bytes) or not isinstance(stops, Iterable):
            raise ConfigurationError(f"expected stop_token_ids to be token ids (ints), got {stops!r}")
        stops = tuple(stops)
        for token in stops:
            check_non_negative_int(token, "stop_token_ids[i]")
        object.__setattr__(self, "stop_token_ids", stops)  # a tuple: hashable, and nobody mutates it mid-request

    @property
    def greedy(self) -> bool:
        """Whether tokens are picked by argmax."""
        return self.temperature == 0


def _real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    *,
    argmax: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[int]:
    """One token id per row of ``logits`` (``[rows, vocab]``, any float dtype; computed in fp32); greedy rows by
    ``argmax`` (``None``: ``torch.argmax(logits, dim=-1)``)."""
    if params.greedy:
        chosen = logits.argmax(dim=-1) if argmax is None else argmax(logits)
        return [int(t) for t in chosen.tolist()]
    # Relative to each row's maximum (a +inf logit becomes 0, not inf - inf = NaN), over a temperature floored at
    # float32's smallest normal number: a smaller one divided by zero, and its limit is the arg-max anyway.
    scores = logits.float()
    top = scores.amax(dim=-1, keepdim=True)
    scores = torch.where(scores == top, 0.0, scores - top) / max(params.temperature, torch.finfo(torch.float32).tiny)
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
