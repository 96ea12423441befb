"""Sampling parameters of a request, and the sampler that turns one step's logits into next tokens.

Greedy decoding (``temperature == 0``) takes the arg-max of the logits after the repetition penalty. Sampled
decoding divides the logits by the temperature, keeps the ``top_k`` largest and then the smallest set whose
probability reaches ``top_p`` (both on the sorted row, as vLLM and transformers do), and draws with the
exponential race: ``argmax(p / q)`` with ``q ~ Exp(1)`` per vocabulary entry picks token ``i`` with probability
``p[i]``. The draw for a request comes from that request's own ``torch.Generator`` seeded with its ``seed``, so
a seeded request produces the same tokens whatever else runs in the same batch (given the same logits).

The repetition penalty is the CTRL/transformers one: for every token already in the prompt or the output, a
positive logit is divided by the penalty and a negative one multiplied by it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.serving import copy_to_device
from llamatelemetry_core.validation import check_non_negative_int, check_positive_int

__all__ = ["SamplingParams", "make_generator", "sample_next_tokens"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes and when it stops.

    Args:
        max_new_tokens: tokens to generate at most (the request finishes with reason ``"length"``; also when the
            sequence reaches the model's ``max_model_len``).
        temperature: ``0`` decodes greedily; a positive value samples from ``softmax(logits / temperature)``.
        top_k: keep only the ``top_k`` most likely tokens when sampling; ``0`` keeps them all.
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (nucleus
            sampling); ``1.0`` keeps them all.
        repetition_penalty: ``> 1`` discourages tokens already in the prompt or output; ``1.0`` is off.
        seed: seeds this request's own generator, so sampled output is reproducible whatever the batch;
            ``None`` draws from torch's global generator.
        stop_token_ids: tokens that end the request (finish reason ``"stop"``), besides the engine's end of
            sequence tokens; the stop token is part of the output.
        stop: strings that end the request once the detokenized output contains one (needs the engine's
            ``detokenize``); the text is cut before the stop string, the tokens are kept.
        ignore_eos: keep generating past the engine's end-of-sequence tokens (``stop_token_ids`` still stop).

    Raises:
        ConfigurationError: a value out of range, naming the field.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        check_positive_int(self.max_new_tokens, "max_new_tokens")
        _check_real(self.temperature, "temperature", "a number >= 0 (0 decodes greedily)", lambda v: v >= 0.0)
        check_non_negative_int(self.top_k, "top_k")
        _check_real(self.top_p, "top_p", "a number in (0, 1] (1 keeps every token)", lambda v: 0.0 < v <= 1.0)
        _check_real(self.repetition_penalty, "repetition_penalty", "a number > 0 (1 is off)", lambda v: v > 0.0)
        if self.seed is not None:
            check_non_negative_int(self.seed, "seed")
            if self.seed >= 2**64:  # what a torch.Generator takes
                raise ConfigurationError(f"expected seed to be an integer in [0, 2**64), got {self.seed}")
        ignore_eos: object = self.ignore_eos
        if not isinstance(ignore_eos, bool):
            raise ConfigurationError(f"expected ignore_eos to be True or False, got {ignore_eos!r}")
        # Tuples, so that the parameters stay hashable and nobody mutates them under a running request.
        # A lone string or token id is one stop, not a sequence of characters.
        stop: object = self.stop
        stop_token_ids: object = self.stop_token_ids
        for name, value in (("stop", stop), ("stop_token_ids", stop_token_ids)):
            if not isinstance(value, str | int | Iterable) or isinstance(value, bytes):
                raise ConfigurationError(
                    f"expected {name} to be one value or a sequence of them, got {type(value).__name__}"
                )
        stops: tuple[object, ...] = (stop,) if isinstance(stop, str) else tuple(cast("Iterable[object]", stop))
        tokens: tuple[object, ...] = (
            (stop_token_ids,) if isinstance(stop_token_ids, int) else tuple(cast("Iterable[object]", stop_token_ids))
        )
        object.__setattr__(self, "stop_token_ids", tokens)
        object.__setattr__(self, "stop", stops)
        for token in tokens:
            check_non_negative_int(token, "stop_token_ids[i]")
        for text in stops:
            if not isinstance(text, str) or not text:
                raise ConfigurationError(f"expected stop to hold non-empty strings, got {text!r}")

    @property
    def greedy(self) -> bool:
        """Whether the request decodes greedily."""
        return self.temperature == 0.0


def _check_real(value: object, name: str, expected: str, ok: object) -> None:
    valid = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not valid or not ok(value):  # type: ignore[operator]
        raise ConfigurationError(f"expected {name} to be {expected}, got {value!r}")


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (one per seeded request)."""
    return torch.Generator(device=device).manual_seed(seed)


ArgMax = Callable[[torch.Tensor], torch.Tensor]
"""``torch.argmax(logits, dim=-1)`` or an equal computation (the same indices, ties and NaN included): the greedy
choice, which a model may provide (see :class:`~llamatelemetry_core.serving.DecoderModel`)."""


def _torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[Sequence[int]],
    *,
    argmax: ArgMax | None = None,
) -> list[int]:
    """Pick the next token of every row of ``logits`` (:func:`sample_token_tensor`, read back to the host)."""
    return [int(t) for t in sample_token_tensor(logits, params, generators, histories, argmax=argmax).tolist()]


def sample_token_tensor(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[Sequence[int]],
    *,
    argmax: ArgMax | None = None,
) -> torch.Tensor:
    """Pick the next token of every row of ``logits``, as an int64 tensor on ``logits.device``: nothing waits for
    the device unless a repetition penalty needs a history on it (the sampled tokens are read back later).

    Args:
        logits: ``[n, vocab]`` float logits, one row per request (any float dtype; computed in float32).
        params: the ``n`` requests' sampling parameters.
        generators: the ``n`` requests' generators on ``logits.device`` (``None``: torch's global generator).
        histories: the ``n`` requests' prompt and output tokens so far (read only with a repetition penalty).
        argmax: the greedy choice of a row (``None``: ``torch.argmax(logits, dim=-1)``).

    Returns:
        The ``n`` chosen token ids ``[n]``.

    Raises:
        ConfigurationError: ``logits`` is not 2-D floating point or the lists do not have ``n`` entries.
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ConfigurationError(
            f"expected logits of shape [n, vocab] and a float dtype, got {list(logits.shape)} {logits.dtype}"
        )
    n = logits.shape[0]
    if not len(params) == len(generators) == len(histories) == n:
        raise ConfigurationError(
            f"expected {n} sampling parameters, generators and histories for {n} rows of logits, got "
            f"{len(params)}, {len(generators)} and {len(histories)}"
        )
    if n == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    penalized = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0 and histories[i]]
    if penalized:
        # A float32 copy: the penalty writes into it.
        logits = logits.to(torch.float32, copy=True)
        for row in penalized:
            penalty = params[row].repetition_penalty
            seen = _on(histories[row], torch.long, logits.device)
            values = logits[row, seen]
            # Clamped to finite values: an extreme penalty must not create infinities that a sampled row's
            # softmax would turn into NaN.
            big = torch.finfo(torch.float32).max
            logits[row, seen] = torch.where(values > 0, values / penalty, values * penalty).clamp(-big, big)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    chosen = (argmax or _torch_argmax)(logits)
    if not sampled_rows:  # all greedy, the common serving case: one arg-max
        return chosen
    index = _on(sampled_rows, torch.long, logits.device)
    probs = _filtered_probs(logits[index].float(), [params[i] for i in sampled_rows])
    chosen[index] = _exponential_race(probs, [generators[i] for i in sampled_rows])
    return chosen


def _on(values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``, copied without waiting for the step being computed."""
    return copy_to_device(torch.tensor(values, dtype=dtype), device)


def _filtered_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k and top-p applied row by row; returns probabilities (zeros where filtered out)."""
    device, vocab = logits.device, logits.shape[-1]
    # A temperature below float32's smallest normal number would divide by zero (or a subnormal) and give NaN;
    # the limit of a vanishing temperature is the arg-max, which the smallest normal one already gives.
    tiny = torch.finfo(torch.float32).tiny
    temperature = _on([max(p.temperature, tiny) for p in params], torch.float32, device)
    # Relative to each row's maximum, so that 0 / temperature stays 0 for the best token; a +inf logit (equal to
    # the maximum) becomes 0 too instead of inf - inf = NaN.
    top = logits.amax(dim=-1, keepdim=True)
    logits = torch.where(logits == top, 0.0, logits - top) / temperature.unsqueeze(1)
    if all(p.top_k == 0 or p.top_k >= vocab for p in params) and all(p.top_p == 1.0 for p in params):
        return torch.softmax(logits, dim=-1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device).unsqueeze(0)
    top_k = _on([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long, device)
    sorted_logits = sorted_logits.masked_fill(rank >= top_k.unsqueeze(1), float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    top_p = _on([p.top_p for p in params], torch.float32, device)
    # Drop a token when the tokens ranked above it already reach top_p; the most likely one always stays.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    return torch.zeros_like(sorted_probs).scatter_(1, order, sorted_probs)


def _exponential_race(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One draw per row: ``argmax(p / q)``, ``q ~ Exp(1)`` from the row's own generator."""
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        index = _on(unseeded, torch.long, probs.device)
        noise[index] = torch.empty((len(unseeded), probs.shape[1]), device=probs.device).exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    # exponential_ may return 0 on some devices; 0 / 0 would be NaN, so floor the noise.
    return (probs / noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
