"""The engine with logits on a CUDA device: sampling there, seeded generators there, half-precision logits.

Skipped without a CUDA device (``gpu`` marker).
"""

from __future__ import annotations

import pytest
import torch

from llamatelemetry_batch.serving import ContinuousBatchingEngine, SamplingParams, SchedulerConfig, SimpleBlockManager
from llamatelemetry_batch.serving.testing import HashDecoder, TinyDecoder
from llamatelemetry_core.serving import StepInput

pytestmark = pytest.mark.gpu


def test_a_paged_tiny_decoder_on_cuda_decodes_as_its_cache_free_reference() -> None:
    model = TinyDecoder(page_size=4, num_blocks=32, max_model_len=40, device="cuda")
    engine = ContinuousBatchingEngine(
        model, SimpleBlockManager(32, 4), scheduler_config=SchedulerConfig(4, 6, watermark=0.0)
    )
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 1], [7] * 13]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    for prompt, output in zip(prompts, outputs, strict=True):
        tokens = list(prompt)
        for _ in range(6):
            tokens.append(int(model.reference_logits(tokens)[-1].argmax()))
        assert list(output.output_token_ids) == tokens[len(prompt) :]


def test_seeded_sampling_on_cuda_does_not_depend_on_the_batch() -> None:
    def run(prompts: list[list[int]]) -> list[tuple[int, ...]]:
        model = HashDecoder(vocab_size=4099, one_hot=False, device="cuda")
        engine = ContinuousBatchingEngine(model)
        params = [SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=7 + i) for i in range(3)]
        return [o.output_token_ids for o in engine.generate(prompts, params[: len(prompts)])]

    alone = run([[1, 2, 3]])[0]
    assert run([[1, 2, 3], [4, 5], [6]])[0] == alone
    assert len(set(alone)) > 1


def test_half_precision_logits_decode_like_float32_ones() -> None:
    class HalfLogits(HashDecoder):
        def step(self, batch: StepInput) -> torch.Tensor:
            return super().step(batch).half()

    prompts = [[1, 2], [9, 9, 9]]
    params = SamplingParams(max_new_tokens=8, repetition_penalty=1.3)
    half = ContinuousBatchingEngine(HalfLogits(device="cuda")).generate(prompts, params)
    full = ContinuousBatchingEngine(HashDecoder(device="cuda")).generate(prompts, params)
    assert [o.output_token_ids for o in half] == [o.output_token_ids for o in full]
