"""On a GPU: logits within fp16 tolerance of transformers on the same random weights, every path on.

Prefill logits (FlashAttention, paged cache, Triton kernels), then decode logits step by step (paged attention
and CUDA graphs), each against transformers' fp16 forward over the whole sequence; and the fp32 engine gives
transformers' greedy tokens exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from llamatelemetry_core.environment import PDL_ENV, programmatic_launch, reload_launch_env
from llamatelemetry_core.serving import SequenceStep, StepInput
from llamatelemetry_engine import LLM, PRESETS, EngineFlags, SamplingParams, random_weights
from llamatelemetry_engine.loader import LoadedModel

pytestmark = pytest.mark.gpu

CONFIG = PRESETS["tiny"].with_overrides(
    hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8, num_kv_heads=2, vocab_size=1000,
    max_position_embeddings=1024,
)  # fmt: skip
# fp16 rounding of every op accumulates over the layers: a model-level bound, not the per-op table's.
ATOL = RTOL = 2e-2


def _hf_fp16(loaded: LoadedModel, hf_reference: Callable[[LoadedModel], torch.nn.Module]) -> torch.nn.Module:
    return hf_reference(loaded).to("cuda", torch.float16)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_prefill_and_decode_logits_match_transformers(
    arch: str, hf_reference: Callable[[LoadedModel], torch.nn.Module]
) -> None:
    config = CONFIG.with_overrides(
        model_type=arch, qkv_bias=arch == "qwen2", sliding_window=48 if arch == "mistral" else None
    )
    loaded = random_weights(config, seed=21)
    hf = _hf_fp16(loaded, hf_reference)
    llm = LLM(loaded, device="cuda", max_model_len=256, max_batch_size=8)
    assert llm.flags.dtype == torch.float16 and llm.flags.active("paged_kv") and llm.flags.active("cuda_graphs")
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, config.vocab_size, (70,), generator=gen).tolist()
    runner, bm = llm.runner, llm.runner.block_manager
    assert bm is not None
    bm.allocate(1, prompt)
    logits = runner.step(StepInput((SequenceStep(1, tuple(prompt), 0, tuple(bm.block_table(1))),)))
    assert logits.dtype == torch.float16  # the model's dtype: the samplers widen what they need
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0, -1].float()
    torch.testing.assert_close(logits[0].float(), ref, atol=ATOL * ref.abs().max().item(), rtol=RTOL)
    seq = list(prompt)
    for _ in range(6):  # decode steps: paged attention, from a CUDA graph
        token = int(logits[0].argmax())
        bm.append(1, [token])
        seq.append(token)
        step = SequenceStep(1, (token,), len(seq) - 1, tuple(bm.block_table(1)))
        logits = runner.step(StepInput((step,)))
        assert logits.dtype == torch.float16
        with torch.no_grad():
            ref = hf(torch.tensor([seq], device="cuda")).logits[0, -1].float()
        torch.testing.assert_close(logits[0].float(), ref, atol=ATOL * ref.abs().max().item(), rtol=RTOL)
    assert runner.graphs is not None and runner.graphs.buckets.replays >= 6
    bm.free(1)


@pytest.mark.parametrize("overlap", [False, True], ids=["in_step", "overlap"])
@pytest.mark.parametrize("step_graphs", [False, True], ids=["eager_prompt_steps", "step_graphs"])
def test_fp32_engine_gives_the_transformers_tokens(
    hf_reference: Callable[[LoadedModel], torch.nn.Module], step_graphs: bool, overlap: bool
) -> None:
    loaded = random_weights(CONFIG, seed=22)
    hf = hf_reference(loaded).to("cuda")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, CONFIG.vocab_size, (n,), generator=gen).tolist() for n in (33, 7, 90)]
    expected = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        out = hf.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)  # type: ignore[operator]
        expected.append(out[0, len(p) :].tolist())
    # A small token budget chunks the prompts, so that steps mix prompt chunks with decodes.
    llm = LLM(loaded, flags=EngineFlags().without("tensor_cores"), device="cuda", max_model_len=256,
              max_num_batched_tokens=32, step_graphs=step_graphs, overlap=overlap)  # fmt: skip
    got = llm.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    assert [c.token_ids for c in got] == expected
    assert (llm.runner.step_graphs is not None) == step_graphs
    if step_graphs:
        assert llm.runner.step_graphs.replays > 0


def _decode_logits(loaded: LoadedModel, prompt: list[int], steps: int) -> list[torch.Tensor]:
    llm = LLM(loaded, device="cuda", max_model_len=256, max_batch_size=4)
    runner, bm = llm.runner, llm.runner.block_manager
    assert bm is not None
    bm.allocate(1, prompt)
    logits = runner.step(StepInput((SequenceStep(1, tuple(prompt), 0, tuple(bm.block_table(1))),)))
    out, seq = [logits[0].clone()], list(prompt)
    for _ in range(steps):  # one token per step: the few-row kernels, replayed from a CUDA graph
        token = int(logits[0].argmax())
        bm.append(1, [token])
        seq.append(token)
        logits = runner.step(StepInput((SequenceStep(1, (token,), len(seq) - 1, tuple(bm.block_table(1))),)))
        out.append(logits[0].clone())
    assert runner.graphs is not None and runner.graphs.buckets.replays >= steps
    bm.free(1)
    return out


def test_programmatic_dependent_launch_changes_no_logit(monkeypatch: pytest.MonkeyPatch) -> None:
    # On Hopper and later the Triton kernels launch with PDL (each may start while the one before finishes and
    # waits for it before reading); the same steps with PDL off must give the same logits, bit for bit.
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    loaded = random_weights(CONFIG, seed=4)
    prompt = torch.randint(3, CONFIG.vocab_size, (40,), generator=torch.Generator().manual_seed(8)).tolist()
    monkeypatch.delenv(PDL_ENV, raising=False)
    reload_launch_env()  # the variable is read once: read it again after each change
    assert programmatic_launch(torch.ones(1, device="cuda"))  # the first run does launch with PDL
    with_pdl = _decode_logits(loaded, prompt, 6)
    monkeypatch.setenv(PDL_ENV, "0")
    reload_launch_env()
    try:
        assert not programmatic_launch(torch.ones(1, device="cuda"))
        without = _decode_logits(loaded, prompt, 6)
    finally:
        monkeypatch.delenv(PDL_ENV)
        reload_launch_env()
    assert len(with_pdl) == len(without) == 7
    for a, b in zip(with_pdl, without, strict=True):
        assert torch.equal(a, b)
