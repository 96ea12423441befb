"""Decode steps replayed from CUDA graphs, one graph per batch size, with ``llamatelemetry-graphs``.

A decode step has one new token per sequence, so with the paged cache its inputs have fixed shapes once the
batch is padded to a captured size: token ids, positions, slot mapping, block tables ``[B, max_blocks]`` and
sequence lengths. :class:`~llamatelemetry_graphs.BatchBucketedGraphs` captures the step for a list of batch
sizes, largest first, into one memory pool, copies each call's inputs into static buffers and pads the rest
(padded rows write no KV, slot ``PAD_SLOT``, and have length 0, which paged attention treats as padding).
Graphs are captured on the first decode step, after the cache exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.kv_layout import PAD_BLOCK, PAD_SLOT
from llamatelemetry_core.serving import SequenceStep
from llamatelemetry_engine.context import PagedStep
from llamatelemetry_graphs import BatchBucketedGraphs

if TYPE_CHECKING:
    from llamatelemetry_engine.runner import ModelRunner

__all__ = ["DecodeGraphs"]


class DecodeGraphs:
    """Graphs of the runner's paged decode step for batch sizes up to ``max_batch_size``."""

    def __init__(self, runner: ModelRunner, max_batch_size: int) -> None:
        if runner.cache is None or runner.paged_attention is None:
            raise ConfigurationError("decode graphs need the paged KV cache (fixed-shape decode steps)")
        self.runner = runner
        self.cache = runner.cache
        self.attention = runner.paged_attention
        self.max_batch_size = max_batch_size
        self.width = runner.max_blocks_per_seq
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
        batch = input_ids.shape[0]
        ctx = PagedStep(
            self.cache,
            self.attention,
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            seq_lens=seq_lens,
            cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device=input_ids.device),
            max_seqlen_q=1,
        )
        hidden = self.runner.model(input_ids, positions, ctx)
        return self.runner.model.logits(hidden).float()

    def fits(self, batch_size: int) -> bool:
        """Whether a decode batch of this size replays a graph."""
        return batch_size <= self.max_batch_size

    def run(self, seqs: tuple[SequenceStep, ...]) -> torch.Tensor:
        """Logits ``[len(seqs), vocab]`` of a decode step (one new token per sequence), from a graph."""
        if not self.captured:
            with torch.inference_mode():
                self.buckets.capture()
            self.captured = True
        inputs = self.runner.decode_metadata(seqs, self.width)
        out: torch.Tensor = self.buckets(*inputs, copy=True)
        return out
