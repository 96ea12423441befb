"""Property test of static batching over a paged block manager: every request completes or fails alone."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamatelemetry_core.serving import StepInput
from llamatelemetry_engine import SamplingParams
from llamatelemetry_engine.errors import RequestTooLargeError
from llamatelemetry_engine.static_batching import Request, StaticBatchEngine
from llamatelemetry_kvcache import BlockManager

VOCAB = 50


class CountingModel:
    """A paged DecoderModel whose next token is (last token + 1) mod VOCAB; checks every step it gets."""

    def __init__(self, block_manager: BlockManager, max_model_len: int) -> None:
        self.block_manager = block_manager
        self.vocab_size = VOCAB
        self.max_model_len = max_model_len
        self.page_size: int | None = block_manager.page_size
        self.max_batch_seen = 0

    def step(self, batch: StepInput) -> torch.Tensor:
        self.max_batch_seen = max(self.max_batch_seen, len(batch.sequences))
        rows = []
        for s in batch.sequences:
            assert s.end_pos == self.block_manager.num_tokens(s.seq_id)
            assert len(s.block_table) >= math.ceil(s.end_pos / self.block_manager.page_size)
            row = torch.zeros(VOCAB)
            row[(s.token_ids[-1] + 1) % VOCAB] = 1.0
            rows.append(row)
        return torch.stack(rows)

    def release(self, seq_id: int) -> None:
        pass


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=10),
    num_blocks=st.integers(2, 12),
    max_batch=st.integers(1, 4),
)
def test_every_request_completes_or_fails_alone(
    lengths: list[tuple[int, int]], num_blocks: int, max_batch: int
) -> None:
    bm = BlockManager(num_blocks, 4, enable_prefix_caching=False)
    model = CountingModel(bm, max_model_len=48)
    engine = StaticBatchEngine(model, max_batch_size=max_batch)
    requests = [
        Request(i, [(i + j) % VOCAB for j in range(n)], SamplingParams(max_tokens=m, ignore_eos=True))
        for i, (n, m) in enumerate(lengths)
    ]
    engine.run(requests)
    for req in requests:
        n, m = len(req.prompt_ids), req.params.max_tokens
        total = min(n + m, model.max_model_len)
        if n >= model.max_model_len or math.ceil(total / 4) > num_blocks:
            assert req.error is not None and req.finish_reason == "error" and req.output_ids == []
            continue
        assert req.error is None and req.finish_reason == "length"
        expected = [(req.prompt_ids[-1] + k) % VOCAB for k in range(1, total - n + 1)]
        assert req.output_ids == expected
    assert model.max_batch_seen <= max_batch
    assert bm.num_free_blocks == num_blocks
    assert all(isinstance(r.error, RequestTooLargeError) for r in requests if r.error and "blocks" in str(r.error))
