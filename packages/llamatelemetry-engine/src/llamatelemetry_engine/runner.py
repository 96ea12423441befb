"""The model runner: a Llama-family model behind core's ``DecoderModel`` protocol.

A continuous-batching engine (``llamatelemetry-batch``) or the engine's own static loop hands the runner one
:class:`~llamatelemetry_core.serving.StepInput` per step; the runner packs its tokens, builds the attention
metadata once (the step context), runs the model and returns the logits (in the model's dtype) of the last new
token of each sequence that wants them. With the paged KV cache on, keys and values go to
``llamatelemetry-kvcache``'s paged cache and every step (prefill, chunked prefill, decode) reads them through
paged attention; a decode step whose batch fits a captured size replays a CUDA graph
(:mod:`llamatelemetry_engine.graphs`). Off, each sequence keeps a growing contiguous KV tensor per layer.
"""

from __future__ import annotations

import math
import warnings
from array import array
from collections.abc import Callable
from typing import Any

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.kv_layout import PAD_BLOCK, PAD_SLOT
from llamatelemetry_core.selection import BackendFallbackWarning
from llamatelemetry_core.serving import SequenceStep, StepInput, TokenFeed, check_feed, copy_to_device
from llamatelemetry_engine.config import ModelConfig
from llamatelemetry_engine.context import ContiguousKVStore, ContiguousStep, PagedStep, StepContext
from llamatelemetry_engine.errors import PromptTooLongError, StepGraphCaptureError
from llamatelemetry_engine.flags import ResolvedFlags
from llamatelemetry_engine.models import LlamaForCausalLM
from llamatelemetry_kvcache import BlockManager, PagedKVCache
from llamatelemetry_triton import triton_argmax

__all__ = ["ModelRunner"]


class ModelRunner:
    """Runs ``model`` one step at a time (implements ``llamatelemetry_core.serving.DecoderModel``).

    It takes tokens fed from the device (``accepts_token_feed``; :class:`~llamatelemetry_core.serving.TokenFeed`),
    so that a continuous-batching engine with ``overlap=True`` launches a step before the previous step's tokens
    reach the host; the step's host-to-device copies do not wait for the device either.

    Args:
        model: the module, already on its device and in its dtype.
        flags: the resolved optimization flags (:func:`~llamatelemetry_engine.flags.resolve_flags`).
        max_model_len: the longest sequence accepted (at most the model's ``max_position_embeddings``).
        paged_cache: the paged KV cache (``llamatelemetry-kvcache``'s ``PagedKVCache``), when ``paged_kv`` is on.
        paged_attention: ``llamatelemetry-flashattn``'s ``paged_attention``, when ``paged_kv`` is on.
        max_batch_size: the largest decode batch captured in CUDA graphs.
        step_graph_tokens: with CUDA graphs on, also replay steps that carry prompt tokens (up to this many
            tokens) from graphs (:class:`~llamatelemetry_engine.graphs.StepGraphs`); ``None``: they run eagerly.
    """

    accepts_token_feed = True

    def __init__(
        self,
        model: LlamaForCausalLM,
        flags: ResolvedFlags,
        *,
        max_model_len: int,
        paged_cache: PagedKVCache | None = None,
        paged_attention: Callable[..., torch.Tensor] | None = None,
        max_batch_size: int = 64,
        step_graph_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.config: ModelConfig = model.config
        self.flags = flags
        self.device = flags.device
        if max_model_len > self.config.max_position_embeddings:
            raise ConfigurationError(
                "expected max_model_len <= the model's max_position_embeddings "
                f"({self.config.max_position_embeddings}), got {max_model_len}"
            )
        self._max_model_len = max_model_len
        self.paged = flags.active("paged_kv")
        if self.paged and (paged_cache is None or paged_attention is None):
            raise ConfigurationError("paged_kv is on: pass the paged cache and the paged attention function")
        self.cache = paged_cache
        self.paged_attention = paged_attention
        self.store = ContiguousKVStore(self.config.num_layers)
        self._page_size: int | None = paged_cache.block_manager.page_size if paged_cache is not None else None
        self.max_blocks_per_seq = math.ceil(max_model_len / self._page_size) if self._page_size else 0
        self._table_rows: dict[int, tuple[tuple[int, ...], int, bytes]] = {}  # seq_id -> (table, width, int32 row)
        self.graphs: Any = None
        self.step_graphs: Any = None
        if self.paged and flags.active("cuda_graphs"):
            from llamatelemetry_engine.graphs import DecodeGraphs, StepGraphs

            self.graphs = DecodeGraphs(self, max_batch_size)
            if step_graph_tokens is not None:
                self.step_graphs = StepGraphs(self, max_batch_size, step_graph_tokens)
        self.steps = 0

    # --- DecoderModel -----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def page_size(self) -> int | None:
        return self._page_size

    @property
    def block_manager(self) -> BlockManager | None:
        """The paged cache's block manager (``None`` without the paged KV cache)."""
        return self.cache.block_manager if self.cache is not None else None

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The greedy tokens of ``logits`` rows, ``torch.argmax(logits, dim=-1)``: with the Triton kernels on,
        through ``llamatelemetry-triton``'s arg-max (the same indices; it cuts a vocabulary-long row over many SMs
        where ``torch.argmax`` reads it with one block)."""
        if self.flags.active("triton_kernels"):
            return triton_argmax(logits)
        return torch.argmax(logits, dim=-1)

    def release(self, seq_id: int) -> None:
        """Forget a sequence's contiguous KV (paged blocks are freed through the block manager) and its cached
        block-table row."""
        self.store.release(seq_id)
        self._table_rows.pop(seq_id, None)

    @torch.inference_mode()
    def step(self, batch: StepInput) -> torch.Tensor:
        """Run ``batch``; return logits ``[batch.num_logits, vocab_size]`` in the model's dtype.

        Not widened to fp32 here: the samplers widen the rows they need (an exact conversion, so arg-max and
        sampled tokens are the same), and at batch 64 of a 128k vocabulary the cast alone was a 49 MB copy, 22 us
        of a 1.35 ms step on an H200.

        Raises :class:`PromptTooLongError` for a sequence past ``max_model_len`` and
        :class:`ConfigurationError` for token ids outside the vocabulary, a block table too short for the step,
        or a contiguous-cache step that does not continue where the sequence's cache ends.
        """
        self._validate(batch)
        feed = batch.feed
        if feed is not None:
            check_feed(batch, feed)
            on, mine = feed.tokens.device, self.device
            if on.type != mine.type or (None not in (on.index, mine.index) and on.index != mine.index):
                raise ConfigurationError(
                    f"expected the fed tokens on the model's device {self.device}, got them on {feed.tokens.device}"
                )
        self.steps += 1
        seqs = batch.sequences
        if self.graphs is not None and all(len(s.token_ids) == 1 for s in seqs) and self.graphs.fits(len(seqs)):
            return _wanted_rows(self.graphs.run(seqs, feed), seqs)
        # A step that carries prompt tokens replays a step graph when one fits, fresh prefills included: on an
        # H200 a 2048-token prefill replayed with paged attention took 9.2 ms, the same prefill run eagerly
        # with FlashAttention 18.9 ms (host time). FlashAttention runs the prefills that fit no graph.
        if self.step_graphs is not None:
            size = self.step_graphs.bucket(seqs)
            if size is not None:
                try:
                    return _wanted_rows(self.step_graphs.run(seqs, size, feed), seqs)
                except StepGraphCaptureError as exc:
                    # Capture runs on placeholder inputs that write no KV: nothing of this step has happened
                    # yet, so it runs eagerly below, and so does every later one.
                    self.step_graphs = None
                    warnings.warn(
                        f"{exc}; steps that carry prompt tokens run eagerly from now on (decode steps still "
                        "replay their graphs). Pass step_graphs=False to LLM to skip the attempt.",
                        BackendFallbackWarning,
                        stacklevel=2,
                    )
        dev = self.device
        input_ids = copy_to_device(torch.tensor([t for s in seqs for t in s.token_ids], dtype=torch.long), dev)
        if feed is not None:
            self.apply_feed(input_ids, seqs, feed)
        positions = copy_to_device(
            torch.tensor([p for s in seqs for p in range(s.start_pos, s.end_pos)], dtype=torch.long), dev
        )
        ctx = self._paged_context(seqs) if self.cache is not None else self._contiguous_context(seqs)
        hidden = self.model(input_ids, positions, ctx)
        last, rows = 0, []
        for s in seqs:
            last += len(s.token_ids)
            if s.want_logits:
                rows.append(last - 1)
        index = copy_to_device(torch.tensor(rows, dtype=torch.long), dev)
        return self.model.logits(hidden.index_select(0, index))

    def apply_feed(self, input_ids: torch.Tensor, seqs: tuple[SequenceStep, ...], feed: TokenFeed) -> None:
        """Write the fed tokens into the step's flat ``input_ids`` (on the device, nothing read back).

        The common case, the same requests as last step in the same order (new ones after them), is one copy
        of a prefix; otherwise one gather and scatter through an index copied to the device."""
        rows = feed.rows
        offset, dst, src = 0, array("q"), array("q")
        prefix = True
        for i, (s, row) in enumerate(zip(seqs, rows, strict=True)):
            if row >= 0:
                dst.append(offset)
                src.append(row)
                prefix = prefix and row == i and offset == i
            offset += len(s.token_ids)
        count = len(dst)
        if not count:
            return
        if prefix and count == (dst[-1] + 1):
            input_ids[:count].copy_(feed.tokens[:count])
            return
        index = copy_to_device(torch.frombuffer(dst + src, dtype=torch.int64), self.device)
        input_ids.index_copy_(0, index[:count], feed.tokens.index_select(0, index[count:]))

    # --- internals -----------------------------------------------------------------------------------------------

    def _validate(self, batch: StepInput) -> None:
        if not batch.sequences:
            raise ConfigurationError("expected a step with at least one sequence, got none")
        if len({s.seq_id for s in batch.sequences}) != len(batch.sequences):
            raise ConfigurationError("expected each sequence once per step, got a repeated seq_id")
        vocab = self.config.vocab_size
        for s in batch.sequences:
            if not s.token_ids:
                raise ConfigurationError(f"sequence {s.seq_id}: expected at least one new token, got none")
            if type(s.start_pos) is not int or s.start_pos < 0:
                raise ConfigurationError(
                    f"sequence {s.seq_id}: expected start_pos to be an int >= 0, got {s.start_pos!r}"
                )
            if s.end_pos > self._max_model_len:
                raise PromptTooLongError(
                    f"sequence {s.seq_id} reaches {s.end_pos} tokens, past max_model_len {self._max_model_len}; "
                    "shorten the prompt or ask for fewer new tokens"
                )
            # Exact ints: a float would become another token in the int64 tensor without a word.
            bad = [t for t in s.token_ids if type(t) is not int or not 0 <= t < vocab]
            if bad:
                raise ConfigurationError(
                    f"sequence {s.seq_id}: token ids must be ints in [0, {vocab}) (the vocabulary), got {bad[:5]}"
                )
            if self.paged:
                needed = math.ceil(s.end_pos / self._page_size)  # type: ignore[operator]
                if len(s.block_table) < needed:
                    raise ConfigurationError(
                        f"sequence {s.seq_id}: {s.end_pos} tokens need {needed} blocks of {self._page_size}, "
                        f"the block table has {len(s.block_table)}"
                    )
            elif self.store.num_tokens(s.seq_id) != s.start_pos:
                raise ConfigurationError(
                    f"sequence {s.seq_id}: the step starts at position {s.start_pos} but its KV cache holds "
                    f"{self.store.num_tokens(s.seq_id)} tokens; the contiguous cache has no prefix reuse or gaps"
                )

    def _contiguous_context(self, seqs: tuple[SequenceStep, ...]) -> StepContext:
        return ContiguousStep(self.store, [s.seq_id for s in seqs], [len(s.token_ids) for s in seqs])

    def paged_metadata(
        self, seqs: tuple[SequenceStep, ...], width: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(slot_mapping int64, block_tables int32 [B, width], seq_lens int32, cu_seqlens_q int32)``."""
        longs, ints, width = self._pack(seqs, width, with_ids=False)
        batch = len(seqs)
        return (
            longs,
            ints[: batch * width].view(batch, width),
            ints[batch * width : batch * width + batch],
            ints[-batch - 1 :],
        )

    def decode_metadata(self, seqs: tuple[SequenceStep, ...], width: int) -> list[torch.Tensor]:
        """A decode step's inputs (one token per sequence): ``[input_ids, positions, slot_mapping]`` int64 and
        ``[block_tables [B, width], seq_lens]`` int32, from two host-to-device copies."""
        longs, ints, _ = self._pack(seqs, width, with_ids=True)
        batch = len(seqs)
        return [
            longs[:batch], longs[batch : 2 * batch], longs[2 * batch :],
            ints[: batch * width].view(batch, width), ints[batch * width : batch * width + batch],
        ]  # fmt: skip

    def step_graph_metadata(
        self, seqs: tuple[SequenceStep, ...], width: int, tokens: int, batch: int
    ) -> list[torch.Tensor]:
        """A step's inputs padded to ``tokens`` tokens and ``batch`` sequences (see
        :class:`~llamatelemetry_engine.graphs.StepGraphs`): ``[input_ids, positions, slot_mapping]`` int64 and
        ``[block_tables [batch, width], seq_lens, cu_seqlens_q, logits_rows]`` int32. The padding tokens belong
        to the first padding sequence (no cached tokens, so attention gives it zeros) and write no KV."""
        longs, ints, _ = self._pack(seqs, width, with_ids=True, tokens_to=tokens, batch_to=batch)
        t, grid = tokens, batch * width
        return [
            longs[:t], longs[t : 2 * t], longs[2 * t :],
            ints[:grid].view(batch, width), ints[grid : grid + batch], ints[grid + batch : grid + 2 * batch + 1],
            ints[grid + 2 * batch + 1 :],
        ]  # fmt: skip

    def _pack(
        self,
        seqs: tuple[SequenceStep, ...],
        width: int | None,
        *,
        with_ids: bool,
        tokens_to: int | None = None,
        batch_to: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The step's metadata as two flat tensors on the device, built in ``array``s (one host loop, no tensor
        per sequence, two copies): int64 ``[ids, positions,] slots``; int32 ``tables, seq_lens, cu_seqlens_q``
        (and the logits rows when padding to ``batch_to`` sequences; tokens padded to ``tokens_to``).

        Per step and sequence this is the engine's host hot path (64 sequences: about 4x less host time than
        nested lists handed to ``torch.tensor``)."""
        page = self._page_size
        assert page is not None
        if width is None:
            width = max(-(-(s.start_pos + len(s.token_ids)) // page) for s in seqs)
        slots, lens, cu = array("q"), array("i"), array("i", [0])
        ids, positions = array("q"), array("q")
        rows: list[bytes] = []
        cached, total = self._table_rows, 0
        for s in seqs:
            table, start, n = s.block_table, s.start_pos, len(s.token_ids)
            end = start + n
            if n == 1:
                slots.append(table[start // page] * page + start % page)
            else:
                slots.extend([table[p // page] * page + p % page for p in range(start, end)])
            if with_ids:
                ids.extend(s.token_ids)
                if n == 1:
                    positions.append(start)
                else:
                    positions.extend(range(start, end))
            # A table changes only when its sequence grows into a new block, and the scheduler hands over the
            # same tuple until then: its padded int32 row is converted once and reused (converting Python ints
            # is most of this loop's cost otherwise).
            hit = cached.get(s.seq_id)
            if hit is None or hit[0] is not table or hit[1] != width:
                row = array("i", table[:width])
                row.extend((PAD_BLOCK,) * (width - len(row)))
                hit = (table, width, row.tobytes())
                cached[s.seq_id] = hit
            rows.append(hit[2])
            lens.append(end)
            total += n
            cu.append(total)
        logits_rows = array("i")
        if batch_to is not None:
            logits_rows = array("i", [c - 1 for c in cu[1:]])
            pad = batch_to - len(seqs)
            rows.append(array("i", (PAD_BLOCK,) * (width * pad)).tobytes())
            lens.extend((0,) * pad)
            cu.extend((tokens_to if tokens_to is not None else total,) * pad)
            logits_rows.extend((0,) * pad)
        if tokens_to is not None:
            pad = tokens_to - total
            ids.extend((0,) * pad)
            positions.extend((0,) * pad)
            slots.extend((PAD_SLOT,) * pad)
        longs = ids + positions + slots if with_ids else slots
        ints = array("i", b"".join(rows)) + lens + cu + logits_rows
        dev = self.device
        # frombuffer shares the arrays' memory (kept alive by the tensors until copied).
        as_long, as_int = torch.frombuffer(longs, dtype=torch.int64), torch.frombuffer(ints, dtype=torch.int32)
        return copy_to_device(as_long, dev), copy_to_device(as_int, dev), width

    def _paged_context(self, seqs: tuple[SequenceStep, ...]) -> StepContext:
        assert self.cache is not None and self.paged_attention is not None
        slot_mapping, block_tables, seq_lens, cu = self.paged_metadata(seqs)
        query_lens = [len(s.token_ids) for s in seqs]
        return PagedStep(
            self.cache,
            self.paged_attention,
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            seq_lens=seq_lens,
            cu_seqlens_q=cu,
            max_seqlen_q=max(query_lens),
            query_lens=query_lens,
            fresh_prefill=all(s.start_pos == 0 for s in seqs),
        )


def _wanted_rows(logits: torch.Tensor, seqs: tuple[SequenceStep, ...]) -> torch.Tensor:
    """The rows of ``logits`` (one per sequence) of the sequences that want logits."""
    want = [i for i, s in enumerate(seqs) if s.want_logits]
    return logits if len(want) == len(seqs) else logits[want]
