"""Decode steps replayed from CUDA graphs, one graph per batch size, with ``llamatelemetry-graphs``.

A decode step has one new token per sequence, so with the paged cache its inputs have fixed shapes once the
batch is padded to a captured size: token ids, positions, slot mapping, block tables ``[B, max_blocks]`` and
sequence lengths. :class:`~llamatelemetry_graphs.BatchBucketedGraphs` captures the step for a list of batch
sizes, largest first, into one memory pool, copies each call's inputs into static buffers and pads the rest
(padded rows write no KV, slot ``PAD_SLOT``, and have length 0, which paged attention treats as padding).
Graphs are captured on the first decode step, after the cache exists.

:class:`StepGraphs` (opt-in: ``LLM(step_graphs=True)``) does the same for steps that carry prompt tokens beside
decodes, which otherwise run eagerly: one graph per token count (powers of two up to the step's token budget),
each for ``max_batch_size + 1`` sequences. A step is padded to the nearest token count; the padding tokens belong
to one extra sequence with no cached tokens (paged attention gives it zeros) and write no KV, and paged attention
is launched for as many query rows per sequence as the graph has tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.kv_layout import PAD_BLOCK, PAD_SLOT
from llamatelemetry_core.serving import SequenceStep, TokenFeed
from llamatelemetry_engine.context import PagedStep
from llamatelemetry_engine.errors import StepGraphCaptureError
from llamatelemetry_graphs import BatchBucketedGraphs, CUDAGraph, GraphPool

if TYPE_CHECKING:
    from llamatelemetry_engine.runner import ModelRunner

__all__ = ["DecodeGraphs", "StepGraphs", "token_buckets"]


class _PagedStepGraphs:
    """What both kinds of graphs share: the runner's paged cache and attention, and the captured forward."""

    def __init__(self, runner: ModelRunner, what: str) -> None:
        if runner.cache is None or runner.paged_attention is None:
            raise ConfigurationError(f"{what} need the paged KV cache (fixed-shape steps)")
        self.runner = runner
        self.cache = runner.cache
        self.attention = runner.paged_attention
        self.width = runner.max_blocks_per_seq

    def _logits(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        metadata: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        max_seqlen_q: int,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the step's tokens in the model's dtype (of ``rows`` only, when given); ``metadata`` is
        ``(slot_mapping, block_tables, seq_lens, cu_seqlens_q)``."""
        slot_mapping, block_tables, seq_lens, cu_seqlens_q = metadata
        ctx = PagedStep(
            self.cache,
            self.attention,
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            seq_lens=seq_lens,
            cu_seqlens_q=cu_seqlens_q,
            max_seqlen_q=max_seqlen_q,
        )
        hidden = self.runner.model(input_ids, positions, ctx)
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        return self.runner.model.logits(hidden)


class DecodeGraphs(_PagedStepGraphs):
    """Graphs of the runner's paged decode step for batch sizes up to ``max_batch_size``."""

    def __init__(self, runner: ModelRunner, max_batch_size: int) -> None:
        super().__init__(runner, "decode graphs")
        self.max_batch_size = max_batch_size
        dev = runner.device
        b = max_batch_size
        examples = [
            torch.zeros(b, dtype=torch.long, device=dev),
            torch.zeros(b, dtype=torch.long, device=dev),
            torch.full((b,), PAD_SLOT, dtype=torch.int64, device=dev),
            torch.full((b, self.width), PAD_BLOCK, dtype=torch.int32, device=dev),
            torch.zeros(b, dtype=torch.int32, device=dev),
        ]
        self.buckets = BatchBucketedGraphs(
            self._decode,
            examples,
            max_batch_size=max_batch_size,
            pad_values=[0, 0, PAD_SLOT, PAD_BLOCK, 0],
            output_batch_dim=0,
        )
        self.captured = False

    def _decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> torch.Tensor:
        cu = torch.arange(input_ids.shape[0] + 1, dtype=torch.int32, device=input_ids.device)
        return self._logits(input_ids, positions, (slot_mapping, block_tables, seq_lens, cu), 1)

    def fits(self, batch_size: int) -> bool:
        """Whether a decode batch of this size replays a graph."""
        return batch_size <= self.max_batch_size

    def run(self, seqs: tuple[SequenceStep, ...], feed: TokenFeed | None = None) -> torch.Tensor:
        """Logits ``[len(seqs), vocab]`` of a decode step (one new token per sequence), from a graph; ``feed``:
        tokens taken from the device (checked by the runner)."""
        if not self.captured:
            with torch.inference_mode():
                self.buckets.capture()
            self.captured = True
        inputs = self.runner.decode_metadata(seqs, self.width)
        if feed is not None:
            self.runner.apply_feed(inputs[0], seqs, feed)
        out: torch.Tensor = self.buckets(*inputs, copy=True)
        return out


def token_buckets(max_tokens: int, smallest: int = 64) -> list[int]:
    """Powers of two from ``smallest`` up to the first one >= ``max_tokens``: the token counts of step graphs."""
    sizes = [smallest]
    while sizes[-1] < max_tokens:
        sizes.append(sizes[-1] * 2)
    return sizes


class StepGraphs(_PagedStepGraphs):
    """Graphs of the runner's paged step (prompt chunks and decodes together) for token counts up to
    ``max_tokens``, each for up to ``max_batch_size`` sequences; captured on first use, largest first, into one
    memory pool."""

    def __init__(self, runner: ModelRunner, max_batch_size: int, max_tokens: int, smallest: int = 64) -> None:
        super().__init__(runner, "step graphs")
        self.max_batch_size = max_batch_size
        self.batch = max_batch_size + 1  # one more sequence owns the padding tokens
        self.sizes = token_buckets(max_tokens, smallest)
        self.pool = GraphPool()
        self.graphs: dict[int, CUDAGraph] = {}
        self.replays = 0

    def _step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        logits_rows: torch.Tensor,
    ) -> torch.Tensor:
        # Any sequence may hold every token of the graph: paged attention is launched for that many query rows.
        metadata = (slot_mapping, block_tables, seq_lens, cu_seqlens_q)
        return self._logits(input_ids, positions, metadata, input_ids.shape[0], logits_rows)

    def bucket(self, seqs: tuple[SequenceStep, ...]) -> int | None:
        """The token count of the graph a step of these sequences replays; ``None`` when none fits."""
        if len(seqs) > self.max_batch_size:
            return None
        total = sum(len(s.token_ids) for s in seqs)
        return next((t for t in self.sizes if t >= total), None)

    def _capture(self) -> None:
        """Capture every token count's graph; on any failure drop what was captured (its memory with it) and
        raise :class:`StepGraphCaptureError` from the cause."""
        try:
            self._capture_all()
        except Exception as exc:
            self.graphs.clear()
            self.pool.clear()
            raise StepGraphCaptureError(f"capturing the step graphs failed: {type(exc).__name__}: {exc}") from exc

    def _capture_all(self) -> None:
        dev, b, w = self.runner.device, self.batch, self.width
        with torch.inference_mode():
            for size in reversed(self.sizes):
                # Valid placeholders: every token belongs to sequence 0, which has no cached tokens (padding).
                cu = torch.full((b + 1,), size, dtype=torch.int32, device=dev)
                cu[0] = 0
                inputs = [
                    torch.zeros(size, dtype=torch.long, device=dev),
                    torch.zeros(size, dtype=torch.long, device=dev),
                    torch.full((size,), PAD_SLOT, dtype=torch.int64, device=dev),
                    torch.full((b, w), PAD_BLOCK, dtype=torch.int32, device=dev),
                    torch.zeros(b, dtype=torch.int32, device=dev),
                    cu,
                    torch.zeros(b, dtype=torch.int32, device=dev),
                ]
                self.pool.capture(f"tokens_{size}", self._step, inputs=inputs)
                self.graphs[size] = self.pool.get(f"tokens_{size}")

    def run(self, seqs: tuple[SequenceStep, ...], size: int, feed: TokenFeed | None = None) -> torch.Tensor:
        """Logits ``[len(seqs), vocab]`` of the last new token of each sequence, from the graph of ``size``
        tokens (:meth:`bucket`); ``feed``: tokens taken from the device (checked by the runner)."""
        if not self.graphs:
            self._capture()
        inputs = self.runner.step_graph_metadata(seqs, self.width, size, self.batch)
        if feed is not None:
            self.runner.apply_feed(inputs[0], seqs, feed)
        out: torch.Tensor = self.graphs[size].replay(*inputs)
        self.replays += 1
        return out[: len(seqs)].clone()  # the static output is overwritten by the next replay
