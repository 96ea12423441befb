"""The block manager contract end to end: llamatelemetry-batch's engine drives llamatelemetry-kvcache's BlockManager.

They meet only through ``llamatelemetry_core.serving.KVBlockManager``. The toy model's next token is a chained
hash of the whole sequence read through the block tables, so a step that starts at the wrong position or reads a
block holding another sequence's (or nobody's) tokens changes the output; with prefix reuse, chunked prefill and
preemption under a small pool, every request must still produce exactly its cache-free greedy tokens.
"""

from __future__ import annotations

import random
import secrets

import pytest

from llamatelemetry.inference.kv_cache import BlockManager

serving = pytest.importorskip("llamatelemetry_batch.serving")
from llamatelemetry_batch.serving.engine import ContinuousBatchingEngine  # noqa: E402
from llamatelemetry_batch.serving.sampling import SamplingParams  # noqa: E402
from llamatelemetry_batch.serving.scheduler import SchedulerConfig  # noqa: E402
from llamatelemetry_batch.serving.testing import HashDecoder  # noqa: E402


@pytest.mark.parametrize(("chunk", "num_blocks"), [(None, 40), (None, 22), (5, 16), (3, 12)])
def test_engine_output_is_exact_with_prefix_reuse_chunks_and_preemption(chunk: int | None, num_blocks: int) -> None:
    seed = secrets.randbits(31)
    print(f"seed {seed}")
    rng = random.Random(seed)
    page = 4
    model = HashDecoder(97, 256, page_size=page, num_blocks=num_blocks)
    manager = BlockManager(num_blocks, page)
    config = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=24, max_prefill_chunk=chunk, watermark=0.0)
    engine = ContinuousBatchingEngine(model, manager, scheduler_config=config)
    system = [rng.randrange(1, 60) for _ in range(9)]  # a shared system prompt: prefix hits
    prompts = [system + [rng.randrange(1, 60) for _ in range(rng.randrange(1, 12))] for _ in range(16)]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=12))
    for prompt, output in zip(prompts, outputs, strict=True):
        assert list(output.output_token_ids) == model.expected_greedy(prompt, 12)
    stats = manager.stats()
    assert stats.used == 0 and stats.num_sequences == 0  # everything freed
    assert stats.prefix_hit_tokens > 0
