"""A running engine keeps serving when one request is bad; the runner's own checks."""

from __future__ import annotations

import pytest

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.serving import DecoderModel, SequenceStep, StepInput
from llamatelemetry_engine import LLM, PRESETS, EngineFlags, PromptTooLongError, SamplingParams, random_weights

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(random_weights(TINY, seed=1), device="cpu", max_model_len=32, max_batch_size=4)


@pytest.fixture(scope="module")
def contiguous() -> LLM:
    flags = EngineFlags().without("paged_kv")
    return LLM(random_weights(TINY, seed=1), flags=flags, device="cpu", max_model_len=32, max_batch_size=4)


def test_the_runner_is_a_decoder_model(llm: LLM) -> None:
    assert isinstance(llm.runner, DecoderModel)
    assert llm.runner.vocab_size == TINY.vocab_size and llm.runner.max_model_len == 32


def test_a_prompt_longer_than_the_context_fails_alone(llm: LLM) -> None:
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    good, bad, good2 = llm.generate([[5, 6, 7], list(range(3, 40)), [9, 10]], params)
    assert isinstance(bad.error, PromptTooLongError) and "context holds 32" in str(bad.error)
    assert bad.finish_reason == "error" and bad.token_ids == []
    assert good.error is None and len(good.token_ids) == 4
    assert good2.error is None and len(good2.token_ids) == 4
    alone = llm.generate([[5, 6, 7]], params)[0]
    assert alone.token_ids == good.token_ids


def test_generation_stops_at_the_context_length(llm: LLM) -> None:
    out = llm.generate([list(range(3, 30))], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 32 - 27


def test_the_runner_refuses_bad_steps(llm: LLM, contiguous: LLM) -> None:
    runner = contiguous.runner
    with pytest.raises(ConfigurationError, match="the vocabulary"):
        runner.step(StepInput((SequenceStep(900, (TINY.vocab_size,), 0),)))
    with pytest.raises(PromptTooLongError, match="past max_model_len 32"):
        runner.step(StepInput((SequenceStep(901, tuple(range(3, 36)), 0),)))
    with pytest.raises(ConfigurationError, match="its KV cache holds 0 tokens"):
        runner.step(StepInput((SequenceStep(902, (5,), 3),)))
    with pytest.raises(ConfigurationError, match="at least one sequence"):
        runner.step(StepInput(()))
    # A float token became another token in the int64 tensor, and a sequence twice in one step wrote its KV twice.
    with pytest.raises(ConfigurationError, match="must be ints"):
        runner.step(StepInput((SequenceStep(904, (1.5,), 0),)))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="repeated seq_id"):
        runner.step(StepInput((SequenceStep(905, (1,), 0), SequenceStep(905, (2,), 0))))
    with pytest.raises(ConfigurationError, match="start_pos"):
        runner.step(StepInput((SequenceStep(906, (1,), -1),)))
    assert runner.store.num_tokens(904) == runner.store.num_tokens(905) == 0
    assert llm.runner.page_size == 16
    with pytest.raises(ConfigurationError, match="need 2 blocks of 16, the block table has 1"):
        llm.runner.step(StepInput((SequenceStep(903, tuple(range(3, 23)), 0, (0,)),)))


def test_chunked_prefill_through_the_runner_matches_one_prefill(contiguous: LLM) -> None:
    runner = contiguous.runner
    prompt = tuple(range(3, 20))
    whole = runner.step(StepInput((SequenceStep(950, prompt, 0),)))
    runner.release(950)
    runner.step(StepInput((SequenceStep(951, prompt[:7], 0, want_logits=False),)))
    runner.step(StepInput((SequenceStep(951, prompt[7:12], 7, want_logits=False),)))
    last = runner.step(StepInput((SequenceStep(951, prompt[12:], 12),)))
    runner.release(951)
    assert (whole - last).abs().max() < 1e-4
    assert int(whole.argmax()) == int(last.argmax())


def test_flags_report_what_runs_here() -> None:
    import torch

    from llamatelemetry_engine import resolve_flags

    resolved = resolve_flags(EngineFlags(), torch.device("cpu"))
    assert resolved.dtype == torch.float32
    assert not resolved.active("cuda_graphs") and resolved.states["cuda_graphs"].reason == "needs a CUDA GPU"
    assert not resolved.active("tensor_cores") and "CPU" in (resolved.states["tensor_cores"].reason or "")
    off = resolve_flags(EngineFlags.all_off(), torch.device("cpu"))
    assert not any(s.active for s in off.states.values())
    assert all(s.reason is None for s in off.states.values())
    with pytest.raises(ConfigurationError, match="unknown engine flag"):
        EngineFlags().without("warp_drive")


@pytest.mark.parametrize("continuous", [True, False])
def test_a_prompt_outside_the_vocabulary_fails_alone(continuous: bool) -> None:
    # The static path raised from the middle of the run (every request lost) where the continuous one failed alone.
    flags = EngineFlags() if continuous else EngineFlags().without("continuous_batching")
    llm = LLM(random_weights(TINY, seed=1), flags=flags, device="cpu", max_model_len=32, max_batch_size=4)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    good, outside, negative = llm.generate([[5, 6], [TINY.vocab_size], [-1, 4]], params)
    assert good.error is None and len(good.token_ids) == 3
    for bad in (outside, negative):
        assert isinstance(bad.error, ConfigurationError) and "vocab_size" in str(bad.error)
        assert bad.finish_reason == "error" and bad.token_ids == []
    with pytest.raises(ConfigurationError, match="token ids to be ints"):
        llm.generate([[1.5, 2]], params)  # type: ignore[list-item]


def test_sampling_parameters_and_engine_arguments_are_checked() -> None:
    for kwargs, match in (
        ({"temperature": "x"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 1.5}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"stop_token_ids": None}, "stop_token_ids"),
        ({"ignore_eos": "no"}, "ignore_eos"),
    ):
        with pytest.raises(ConfigurationError, match=match):
            SamplingParams(**kwargs)
    assert SamplingParams(stop_token_ids=5).stop_token_ids == (5,)  # type: ignore[arg-type]
    loaded = random_weights(TINY, seed=1)
    for kwargs, match in (
        ({"max_model_len": 0}, "max_model_len"),
        ({"device": "tpu"}, "device"),
        ({"seed": "a"}, "seed"),
        ({"admission_batch": 0}, "admission_batch"),
        ({"admission_batch": 65}, r"admission_batch <= max_batch_size \(64\)"),
    ):
        with pytest.raises(ConfigurationError, match=match):
            LLM(loaded, **kwargs)
    with pytest.raises(TypeError, match="flags"):
        LLM(loaded, flags={"paged_kv": False})  # type: ignore[arg-type]


def test_a_vanishing_temperature_samples_the_arg_max_on_the_static_path() -> None:
    flags = EngineFlags().without("continuous_batching")
    llm = LLM(random_weights(TINY, seed=1), flags=flags, device="cpu", max_model_len=32, max_batch_size=4)
    greedy = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids
    tiny = SamplingParams(max_tokens=4, ignore_eos=True, temperature=1e-45, seed=3)
    assert llm.generate([[5, 6, 7]], tiny)[0].token_ids == greedy  # multinomial raised on NaN probabilities


def test_batched_admission_gives_the_same_tokens() -> None:
    # admission_batch changes when prompts start, never what a request computes: greedy tokens are the same.
    loaded = random_weights(TINY, seed=1)
    prompts = [[5 + i, 6, 7 + i] for i in range(6)]
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    one = LLM(loaded, device="cpu", max_model_len=32, max_batch_size=4)
    four = LLM(loaded, device="cpu", max_model_len=32, max_batch_size=4, admission_batch=4)
    assert one.admission_batch == 1 and four.admission_batch == 4  # no CUDA graphs on a CPU: default 1
    expected = [c.token_ids for c in one.generate(prompts, params)]
    assert [c.token_ids for c in four.generate(prompts, params)] == expected
    assert four.continuous_server().engine.scheduler.config.admission_batch == 4
