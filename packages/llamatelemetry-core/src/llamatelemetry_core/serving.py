"""Protocols the serving pieces meet through: a KV block manager, a decoder model, and one step's input.

``llamatelemetry-kvcache`` implements :class:`KVBlockManager`; ``llamatelemetry-batch``'s scheduler and engine
loop consume it and drive any :class:`DecoderModel`; a model runner (``llamatelemetry-engine``, or a user's own)
implements :class:`DecoderModel`. None of them imports another: they agree on this module.

A step is planned once on the host (:class:`StepInput`, plain Python lists, no tensors) and handed to the model,
which turns it into device tensors once and shares them with every layer (FlashInfer's ``plan``/``run`` split,
nano-vllm's per-step context).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from llamatelemetry_core.errors import ConfigurationError

__all__ = [
    "DecoderModel",
    "KVBlockManager",
    "SequenceStep",
    "StepInput",
    "TokenFeed",
    "check_decode_step",
    "check_feed",
    "check_token_ids",
    "copy_to_device",
]


_INT = frozenset({int})


def check_token_ids(token_ids: object, name: str = "token_ids") -> None:
    """What a :class:`KVBlockManager` checks of the tokens it is given: a sequence (not a string) of ints >= 0.

    Raises ``ConfigurationError`` naming ``name``; exact type tests, so a float, a bool or a string never becomes
    another token. One token (a decode step's append) is checked without a pass over a list.
    """
    if type(token_ids) is list and len(token_ids) == 1:
        token = token_ids[0]
        if type(token) is int and token >= 0:
            return
    if type(token_ids) is not list and (isinstance(token_ids, str | bytes) or not isinstance(token_ids, Sequence)):
        raise ConfigurationError(f"expected {name} to be a sequence of ints, got {type(token_ids).__name__}")
    if token_ids and (not set(map(type, token_ids)) <= _INT or min(token_ids) < 0):
        bad = next(t for t in token_ids if type(t) is not int or t < 0)
        raise ConfigurationError(f"expected {name} to hold ints >= 0, got {bad!r} ({type(bad).__name__})")


def check_decode_step(seq_ids: Sequence[int], token_ids: Sequence[int]) -> None:
    """What every :meth:`KVBlockManager.append_decode` checks first: one token per sequence, each sequence once,
    tokens ints >= 0. Raises ``ConfigurationError`` naming the argument at fault. (A sequence id that is not a
    known key raises the manager's ``KeyError``.)"""
    for name, values in (("seq_ids", seq_ids), ("token_ids", token_ids)):
        if type(values) is not list and (isinstance(values, str | bytes) or not isinstance(values, Sequence)):
            raise ConfigurationError(f"expected {name} to be a sequence of ints, got {type(values).__name__}")
    # Exact type tests in C (map, set), then the sign: a decode step runs this for every sequence, every step.
    if token_ids and (not set(map(type, token_ids)) <= _INT or min(token_ids) < 0):
        bad = next(t for t in token_ids if type(t) is not int or t < 0)
        raise ConfigurationError(f"expected token_ids to hold ints >= 0, got {bad!r} ({type(bad).__name__})")
    if len(seq_ids) != len(token_ids):
        raise ConfigurationError(
            f"expected one token per sequence, got {len(seq_ids)} sequence ids (seq_ids) and {len(token_ids)} "
            "tokens (token_ids)"
        )
    if len(set(seq_ids)) != len(seq_ids):
        raise ConfigurationError("expected each sequence once per decode step, got a repeated sequence id in seq_ids")


def copy_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of the CPU tensor ``host`` on ``device`` (its own memory: ``host`` may be a view of a buffer that
    goes away). To a GPU it goes through pinned memory with a non-blocking copy: a plain copy from pageable memory
    waits until the device has finished every queued step, which an engine that plans a step while the device
    computes the previous one cannot afford."""
    if device.type == "cpu":
        return host.clone()
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@runtime_checkable
class KVBlockManager(Protocol):
    """Bookkeeping of a paged KV cache: which blocks each sequence holds. Pure Python, no tensors.

    Sequences are named by an ``int`` id chosen by the caller. Every method that cannot be carried out raises
    :class:`~llamatelemetry_core.errors.CapacityError` (out of blocks) or ``KeyError`` (unknown sequence) and
    changes nothing; ``can_allocate``/``can_append`` answer first, so a scheduler can preempt instead.
    """

    @property
    def page_size(self) -> int:
        """Tokens per block."""
        ...

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool."""
        ...

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, or cached and unreferenced, hence evictable)."""
        ...

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Whether a new sequence of these tokens fits now (prefix-cache hits counted)."""
        ...

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Give a new sequence blocks for ``token_ids``; return how many leading tokens are already cached.

        The returned count is a multiple of ``page_size`` and less than ``len(token_ids)``: at least the last
        token is always computed, so the model produces the logits of the next one.
        """
        ...

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        """Whether ``num_tokens`` more tokens of a running sequence fit now."""
        ...

    def append(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Extend a running sequence by ``token_ids`` (decode), taking new blocks as needed."""
        ...

    def append_decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """Extend each sequence of ``seq_ids`` by one token (``token_ids[i]`` for ``seq_ids[i]``): a decode step
        in one call, all or nothing.

        ``ConfigurationError`` for mismatched lengths or a repeated id, ``KeyError`` for an unknown sequence,
        ``CapacityError`` when the blocks do not suffice; nothing changes then.
        """
        ...

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks (full blocks stay cached for prefix reuse until evicted)."""
        ...

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's blocks, in token order."""
        ...

    def num_tokens(self, seq_id: int) -> int:
        """Tokens the sequence holds."""
        ...

    # Beyond the checked protocol, optional: ``replace_last_tokens(seq_ids, token_ids)`` sets the last token of
    # each sequence, which was appended as a stand-in because its value was still on the device (an engine that
    # overlaps its host work with the model; see TokenFeed). A manager that reads token values (prefix hashes)
    # must not have used the stand-in yet; one that only counts tokens accepts the call and changes nothing. An
    # engine overlaps only with a manager that has this method.


@dataclass(slots=True)
class SequenceStep:
    """What one sequence contributes to a step.

    ``token_ids`` are the new tokens to compute this step (a whole prompt, a chunk of it, or one decoded token);
    they occupy positions ``start_pos .. start_pos + len(token_ids) - 1``, and everything before ``start_pos`` is
    already in the KV cache. ``block_table`` lists the sequence's blocks (paged models) and covers at least
    ``start_pos + len(token_ids)`` tokens. ``want_logits`` says whether the model returns the logits of the last
    new token (false for a prefill chunk that does not end the prompt).

    Slotted and not frozen, because a scheduler builds one per running sequence per step (a frozen dataclass
    costs several times more to construct); treat it as read-only once handed to a model.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...] = ()
    want_logits: bool = True

    @property
    def end_pos(self) -> int:
        """Tokens in the cache once this step has run."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class TokenFeed:
    """New tokens that are still on the device: the ones sampled in the previous step, not read back yet.

    An engine that overlaps its host work with the model (it plans step ``n + 1`` while step ``n`` runs) cannot
    put the tokens sampled in step ``n`` into step ``n + 1``'s ``token_ids``: it puts a stand-in (``0``) there
    and names, in ``rows``, the element of ``tokens`` that replaces it. ``rows[i]`` belongs to
    ``StepInput.sequences[i]``: ``-1`` when its ``token_ids`` are real, else an index into ``tokens``, and then
    that sequence has exactly one new token. Only a model whose ``accepts_token_feed`` attribute is true is
    handed a feed (see :class:`DecoderModel`).
    """

    tokens: torch.Tensor
    """1-D int64 token ids on the model's device."""
    rows: tuple[int, ...]


@dataclass(frozen=True)
class StepInput:
    """One model step: the scheduled sequences, in the order their logits come back, and the tokens that come
    from the device instead of ``token_ids`` (:class:`TokenFeed`; ``None``: every token is in ``token_ids``)."""

    sequences: tuple[SequenceStep, ...]
    feed: TokenFeed | None = None

    @property
    def num_tokens(self) -> int:
        """New tokens computed this step, over every sequence (the step's token budget)."""
        return sum(len(s.token_ids) for s in self.sequences)

    @property
    def num_logits(self) -> int:
        """Rows of the logits the model returns."""
        return sum(1 for s in self.sequences if s.want_logits)

    def read_feed(self) -> StepInput:
        """This step with the fed tokens read back into ``token_ids`` (waits for the device), for a model that
        reads token values on the host; ``self`` when nothing is fed.

        Raises ``ConfigurationError`` for a feed that does not match the sequences (see :class:`TokenFeed`).
        """
        feed = self.feed
        if feed is None:
            return self
        rows = check_feed(self, feed)
        values = feed.tokens.tolist()
        steps = tuple(
            s if row < 0 else SequenceStep(s.seq_id, (int(values[row]),), s.start_pos, s.block_table, s.want_logits)
            for s, row in zip(self.sequences, rows, strict=True)
        )
        return StepInput(steps)


def check_feed(batch: StepInput, feed: TokenFeed) -> tuple[int, ...]:
    """``feed.rows`` once checked against ``batch``: one row per sequence, each ``-1`` or an index into a 1-D
    int64 ``feed.tokens``, and a fed sequence has one new token. Raises ``ConfigurationError`` naming the fault."""
    given: object = feed.tokens
    rows = feed.rows
    if not isinstance(given, torch.Tensor):
        raise ConfigurationError(f"expected TokenFeed.tokens to be a 1-D int64 tensor, got {type(given).__name__}")
    tokens = given
    if tokens.dim() != 1 or tokens.dtype != torch.int64:
        raise ConfigurationError(
            f"expected TokenFeed.tokens to be a 1-D int64 tensor, got {list(tokens.shape)} {tokens.dtype}"
        )
    if len(rows) != len(batch.sequences):
        raise ConfigurationError(
            f"expected one TokenFeed row per sequence of the step ({len(batch.sequences)}), got {len(rows)}"
        )
    count = tokens.shape[0]
    for s, row in zip(batch.sequences, rows, strict=True):
        if type(row) is not int or not -1 <= row < count:
            raise ConfigurationError(
                f"sequence {s.seq_id}: expected its TokenFeed row to be -1 or an index below {count}, got {row!r}"
            )
        if row >= 0 and len(s.token_ids) != 1:
            raise ConfigurationError(
                f"sequence {s.seq_id}: a fed token replaces a step's only new token, got {len(s.token_ids)} tokens"
            )
    return rows


@runtime_checkable
class DecoderModel(Protocol):
    """A decoder-only language model that a continuous-batching engine can drive one step at a time."""

    @property
    def vocab_size(self) -> int:
        """Size of the logits' last dimension."""
        ...

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt plus generated tokens) the model accepts."""
        ...

    @property
    def page_size(self) -> int | None:
        """Tokens per KV block for a paged model (the block manager must use the same), ``None`` otherwise."""
        ...

    def step(self, batch: StepInput) -> torch.Tensor:
        """Run the new tokens of every sequence, writing their K/V, and return logits.

        Returns float logits of shape ``[batch.num_logits, vocab_size]``: one row per sequence with
        ``want_logits``, in the order of ``batch.sequences``, for its last new token.

        A model may set a class attribute ``accepts_token_feed = True`` (it is not part of the protocol's
        checks): it then takes the tokens named by ``batch.feed`` from the device (:class:`TokenFeed`), which
        lets an engine launch a step before the previous step's tokens have reached the host. Without it, an
        engine hands over real tokens only.

        A model may also have a method ``argmax(logits) -> torch.Tensor`` (not part of the checks either): an
        engine then picks greedy tokens with it instead of ``torch.argmax(logits, dim=-1)``. It must return the
        same int64 indices (the first of equal maxima, NaN above every number), on the logits' device.
        """
        ...

    def release(self, seq_id: int) -> None:
        """Forget a finished or preempted sequence's per-sequence state (a no-op for paged models)."""
        ...
