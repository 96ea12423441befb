"""Greedy tokens identical to transformers' ``generate`` on the same weights, whatever the flags."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from llamatelemetry_core.selection import record_selections
from llamatelemetry_engine import FLAG_NAMES, LLM, PRESETS, EngineFlags, SamplingParams, random_weights
from llamatelemetry_engine.loader import LoadedModel
from llamatelemetry_engine.models import DecoderLayer
from llamatelemetry_engine.models.llama import FEW_ROW_TOKENS, SMALL_M_TOKENS
from llamatelemetry_triton import HAS_TRITON
from llamatelemetry_triton.heuristics import LINEAR_MAX_ROWS

Greedy = Callable[[torch.nn.Module, list[int], int], list[int]]
# Under Triton's interpreter every fused kernel runs in Python: fewer tokens there.
NEW_TOKENS = 5 if os.environ.get("TRITON_INTERPRET") == "1" else 10

FLAG_SETS = {
    "all_on": EngineFlags(),
    "all_off": EngineFlags.all_off(),
    **{f"no_{name}": EngineFlags().without(name) for name in FLAG_NAMES},
}

TINY = PRESETS["tiny"]
ARCHS = {
    "llama_gqa2": TINY,
    "llama_mqa_tied": TINY.with_overrides(num_kv_heads=1, tie_word_embeddings=True),
    "llama_mha_bias_llama3": TINY.with_overrides(
        num_kv_heads=4, qkv_bias=True, o_bias=True,
        rope_scaling=PRESETS["llama-3.2-1b"].rope_scaling.__class__("llama3", 8.0, 1.0, 4.0, 64),
    ),
    "qwen2": TINY.with_overrides(model_type="qwen2", qkv_bias=True, num_heads=6, num_kv_heads=2, head_dim=16),
    "mistral_window": TINY.with_overrides(model_type="mistral", sliding_window=5),
}  # fmt: skip


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (9, 3, 17)]


@pytest.mark.kernel_paths
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_matches_transformers(
    arch: str, prompts: list[list[int]], hf_reference: Callable[[LoadedModel], torch.nn.Module], greedy: Greedy
) -> None:
    loaded = random_weights(ARCHS[arch], seed=5)
    reference = hf_reference(loaded)
    expected = [greedy(reference, p, NEW_TOKENS) for p in prompts]
    for flags in (EngineFlags(), EngineFlags.all_off()):
        llm = LLM(loaded, flags=flags, device="cpu")
        got = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
        assert [c.token_ids for c in got] == expected, f"{arch} with {flags}"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_merged_projections_keep_the_transformers_tokens(
    arch: str, prompts: list[list[int]], hf_reference: Callable[[LoadedModel], torch.nn.Module], greedy: Greedy
) -> None:
    # On a GPU with Tensor Cores the engine merges q/k/v and gate/up into one matmul each; a CPU does not, so the
    # merge is applied here by hand (biases and grouped heads included) and must keep transformers' tokens.
    loaded = random_weights(ARCHS[arch], seed=5)
    expected = [greedy(hf_reference(loaded), p, NEW_TOKENS) for p in prompts]
    llm = LLM(loaded, device="cpu")
    llm.model.merge_projections()
    layer = llm.model.model.layers[0]
    assert isinstance(layer, DecoderLayer)
    assert layer.self_attn.qkv_proj is not None and layer.mlp.gate_up_proj is not None
    assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "up_proj")
    got = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [c.token_ids for c in got] == expected


@pytest.mark.kernel_paths
@pytest.mark.parametrize("arch", ["llama_mha_bias_llama3", "qwen2"])
def test_the_few_row_projections_keep_the_transformers_tokens(
    arch: str, prompts: list[list[int]], hf_reference: Callable[[LoadedModel], torch.nn.Module], greedy: Greedy
) -> None:
    # On a GPU, one-token steps run the merged projections through the few-row kernels (norms and
    # SwiGLU fused in); a CPU does not, so the path is switched on here by hand, for every layer.
    loaded = random_weights(ARCHS[arch], seed=5)
    reference = hf_reference(loaded)
    llm = LLM(loaded, device="cpu")
    llm.model.merge_projections()
    for layer in llm.model.model.layers:
        # Without Triton the engine leaves the path off (the references would only be slower); forced on here,
        # the references of the fused ops run and must keep the tokens too.
        assert isinstance(layer, DecoderLayer) and layer.few_row_tokens == (FEW_ROW_TOKENS if HAS_TRITON else 0)
        layer.few_row_tokens, layer.few_row_devices = FEW_ROW_TOKENS, ("cpu",)
    single = prompts[:1]  # one sequence: every decode step has one token
    with record_selections() as rec:
        got = llm.generate(single, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [c.token_ids for c in got] == [greedy(reference, p, NEW_TOKENS) for p in single]
    for op in ("triton.rmsnorm_linear", "triton.fused_add_rmsnorm_linear", "triton.linear", "triton.swiglu_linear"):
        assert rec.implementations(op), f"{op} never ran"
    # Two sequences prefilled together decode two tokens per step (still FEW_ROW_TOKENS or fewer): one down
    # projection per layer and step, NEW_TOKENS - 1 steps (the first token comes from the prefill).
    with record_selections() as rec:
        got = llm.generate(prompts[:2], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [c.token_ids for c in got] == [greedy(reference, p, NEW_TOKENS) for p in prompts[:2]]
    assert len(rec.implementations("triton.swiglu_linear")) == len(llm.model.model.layers) * (NEW_TOKENS - 1)
    # Three sequences decode three tokens per step: past FEW_ROW_TOKENS, the usual path (and the same tokens).
    with record_selections() as rec:
        got = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [c.token_ids for c in got] == [greedy(reference, p, NEW_TOKENS) for p in prompts]
    assert not rec.implementations("triton.swiglu_linear") and rec.implementations("triton.swiglu")


@pytest.mark.kernel_paths
def test_the_small_m_projections_keep_the_transformers_tokens(
    hf_reference: Callable[[LoadedModel], torch.nn.Module], greedy: Greedy
) -> None:
    # On a Hopper GPU, steps of LINEAR_MAX_ROWS + 1 to SMALL_M_TOKENS tokens run the merged projections through
    # triton_linear (its small-M kernel, SwiGLU fused into gate/up); forced on here for every layer. In fp32 on a
    # CPU the op runs its reference: the path's composition must keep transformers' tokens (the kernel itself is
    # checked against the reference in llamatelemetry-triton's tests).
    loaded = random_weights(ARCHS["llama_mha_bias_llama3"], seed=6)
    reference = hf_reference(loaded)
    llm = LLM(loaded, device="cpu")
    llm.model.merge_projections()
    for layer in llm.model.model.layers:
        assert isinstance(layer, DecoderLayer) and layer.small_m_tokens == (SMALL_M_TOKENS if HAS_TRITON else 0)
        layer.small_m_tokens, layer.few_row_devices = SMALL_M_TOKENS, ("cpu",)
    many = [list(range(3 + i, 10 + 2 * i)) for i in range(LINEAR_MAX_ROWS + 2)]  # decode steps of 10 tokens
    with record_selections() as rec:
        got = llm.generate(many, SamplingParams(max_tokens=3, ignore_eos=True))
    assert [c.token_ids for c in got] == [greedy(reference, p, 3) for p in many]
    # Two decode steps of ten tokens (the first token comes from the prefill): q/k/v, o, gate/up with the SwiGLU
    # epilogue and down through triton_linear in every layer; the prefill steps (over SMALL_M_TOKENS tokens, or
    # chunked) take the usual path with its SwiGLU kernel.
    layers = len(llm.model.model.layers)
    assert len(rec.implementations("triton.linear")) == 4 * layers * 2
    assert len(rec.implementations("triton.swiglu")) < 2 * layers


@pytest.mark.parametrize("name", sorted(FLAG_SETS))
def test_each_flag_switched_off_keeps_the_tokens(
    name: str, prompts: list[list[int]], hf_reference: Callable[[LoadedModel], torch.nn.Module], greedy: Greedy
) -> None:
    loaded = random_weights(TINY, seed=7)
    expected = [greedy(hf_reference(loaded), p, NEW_TOKENS) for p in prompts]
    llm = LLM(loaded, flags=FLAG_SETS[name], device="cpu", max_batch_size=2)
    got = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert [c.token_ids for c in got] == expected
    assert all(c.finish_reason == "length" and c.error is None for c in got)


def test_stream_yields_the_generated_tokens(prompts: list[list[int]]) -> None:
    llm = LLM(random_weights(TINY, seed=7), device="cpu")
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert list(llm.stream(prompts[0], params)) == llm.generate([prompts[0]], params)[0].token_ids


def test_sampling_is_reproducible_with_a_seed(prompts: list[list[int]]) -> None:
    llm = LLM(random_weights(TINY, seed=7), device="cpu")
    params = SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=123, ignore_eos=True)
    first = llm.generate([prompts[0]], params)[0].token_ids
    assert llm.generate([prompts[0]], params)[0].token_ids == first
    assert len(first) == 8 and all(0 <= t < TINY.vocab_size for t in first)


def test_generation_stops_at_end_of_sequence(prompts: list[list[int]]) -> None:
    llm = LLM(random_weights(TINY, seed=7), device="cpu")
    free = llm.generate([prompts[0]], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))[0].token_ids
    stop = free[3]
    got = llm.generate([prompts[0]], SamplingParams(max_tokens=NEW_TOKENS, stop_token_ids=(stop,)))[0]
    assert got.token_ids == free[: free.index(stop) + 1] and got.finish_reason == "stop"


def test_greedy_tokens_are_picked_by_the_triton_argmax_when_the_kernels_are_on(prompts: list[list[int]]) -> None:
    # The runner hands the serving engine its argmax: llamatelemetry-triton's with the Triton kernels on (its
    # kernel where Triton runs, else its reference), torch.argmax with them off; the tokens are the same.
    loaded = random_weights(TINY, seed=5)
    outputs = {}
    for name, flags in (("on", EngineFlags()), ("off", EngineFlags().without("triton_kernels"))):
        llm = LLM(loaded, flags=flags, device="cpu")
        with record_selections() as rec:
            got = llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
        outputs[name] = [c.token_ids for c in got]
        assert bool(rec.implementations("triton.argmax")) == (name == "on"), name
    assert outputs["on"] == outputs["off"]
