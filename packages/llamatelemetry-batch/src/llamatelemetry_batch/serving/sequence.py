"""A request's state while the engine runs it: its tokens, how far the KV cache holds them, and its metrics.

Token bookkeeping of a :class:`Sequence` (``n`` = ``num_tokens``, prompt plus generated tokens):

* ``num_computed_tokens``: tokens whose K/V the model has written (or the prefix cache already held);
* ``num_allocated_tokens``: tokens the block manager holds blocks for (``>= num_computed_tokens``);
* the tokens ``num_computed_tokens .. n - 1`` are computed by the next steps: a prompt (maybe in chunks), or
  the one token sampled last step (decode). When the last of them is computed, the model returns the logits
  of the next token.

A preempted sequence drops its blocks and computed tokens and waits again; its generated tokens stay, so the
recomputation treats them as part of the prompt.
"""

from __future__ import annotations

import enum
import itertools
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from llamatelemetry_batch.serving.sampling import SamplingParams
from llamatelemetry_batch.serving.text import IncrementalDetokenizer

__all__ = ["FinishReason", "RequestMetrics", "RequestOutput", "Sequence", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    """Where a sequence is: the waiting queue, the running batch, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a request finished."""

    LENGTH = "length"
    """``max_new_tokens`` generated, or the sequence reached the model's ``max_model_len``."""
    STOP = "stop"
    """An end-of-sequence token, one of ``stop_token_ids``, or a stop string."""
    CANCELLED = "cancelled"
    """Cancelled by the caller."""
    ERROR = "error"
    """The model, the detokenizer or a callback of the request raised (see ``RequestOutput.error``)."""


@dataclass
class RequestMetrics:
    """Timestamps of a request (``time.perf_counter()`` seconds) and what they imply."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0
    """Prompt tokens the prefix cache held at the first admission (not computed)."""

    @property
    def queue_time(self) -> float | None:
        """Seconds from submission to the first step that ran the request."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from submission to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def inter_token_latencies(self) -> list[float]:
        """Seconds between consecutive generated tokens."""
        times = self.token_times
        return [b - a for a, b in itertools.pairwise(times)]

    @property
    def mean_inter_token_latency(self) -> float | None:
        """Mean of :attr:`inter_token_latencies` (``None`` with fewer than two tokens)."""
        gaps = self.inter_token_latencies
        return statistics.fmean(gaps) if gaps else None


@dataclass(frozen=True)
class RequestOutput:
    """What a request produced: its tokens, text (when the engine has a detokenizer), and why it stopped."""

    request_id: int
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    text: str | None
    finish_reason: FinishReason | None
    metrics: RequestMetrics
    error: BaseException | None = None

    @property
    def finished(self) -> bool:
        """Whether the request is done."""
        return self.finish_reason is not None


class Sequence:
    """One request inside the engine (mutable; owned by the engine loop's thread)."""

    __slots__ = (
        "block_table",
        "blocked_on",
        "detokenizer",
        "error",
        "finish_reason",
        "generator",
        "max_num_tokens",
        "metrics",
        "num_allocated_tokens",
        "num_computed_tokens",
        "num_prompt_tokens",
        "params",
        "seq_id",
        "stand_ins",
        "status",
        "table_tuple",
        "token_ids",
    )

    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams, max_model_len: int) -> None:
        self.seq_id = seq_id
        self.token_ids = prompt_token_ids
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.max_num_tokens = min(self.num_prompt_tokens + params.max_new_tokens, max_model_len)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_allocated_tokens = 0
        self.block_table: list[int] = []
        self.table_tuple: tuple[int, ...] = ()
        # Cached blocks (index in the table, block id) whose K/V another sequence has not finished writing.
        self.blocked_on: deque[tuple[int, int]] = deque()
        self.generator: torch.Generator | None = None
        self.finish_reason: FinishReason | None = None
        self.error: BaseException | None = None
        self.detokenizer: IncrementalDetokenizer | None = None
        self.metrics = RequestMetrics(arrival_time=time.perf_counter())
        # Trailing tokens of token_ids that are stand-ins (0) for tokens sampled but still on the device, with an
        # engine that overlaps its host work with the model; the engine writes their values once read back.
        self.stand_ins = 0

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens (a copy)."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        """The newest token."""
        return self.token_ids[-1]

    @property
    def finished(self) -> bool:
        """Whether the sequence is done."""
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
