"""Fuzzing the engine's public entry points on a tiny seeded model (see ``llamatelemetry_core.testing.fuzz``).

* Greedy output with every optimization on equals the plain-PyTorch path (every flag off) on random prompts.
* ``generate``/``stream`` with hostile prompts (empty, past the context, out of the vocabulary, floats, ``None``)
  and hostile parameters: a typed error naming the argument for the call, or a per-request error while the other
  requests complete with the plain path's tokens.
* :class:`SamplingParams` with hostile values, and every valid one served: the arg-max where only the arg-max can
  be drawn, seeded output reproducible, stop tokens and lengths respected.
* :class:`LLM` and :class:`EngineFlags` with hostile arguments: typed errors naming them, checked before loading.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamatelemetry_core.testing.fuzz import check_call, fuzz_settings
from llamatelemetry_engine import FLAG_NAMES, LLM, PRESETS, EngineFlags, SamplingParams, random_weights
from llamatelemetry_engine.loader import LoadedModel

CONFIG = PRESETS["tiny"].with_overrides(
    num_layers=1, hidden_size=32, intermediate_size=48, vocab_size=64, max_position_embeddings=64
)
VOCAB, MAX_LEN = CONFIG.vocab_size, 24
EOS = CONFIG.eos_token_ids


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return random_weights(CONFIG, seed=3)


@pytest.fixture(scope="module")
def engines(loaded: LoadedModel) -> dict[str, LLM]:
    """Every optimization on, and the plain-PyTorch path, over the same weights."""
    kwargs: dict[str, Any] = {"device": "cpu", "max_model_len": MAX_LEN, "max_batch_size": 3}
    return {
        "on": LLM(loaded, **kwargs),
        "off": LLM(loaded, flags=EngineFlags.all_off(), **kwargs),
    }


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _plain_greedy(engines: dict[str, LLM], prompt: list[int], max_tokens: int) -> list[int]:
    """The plain path's greedy tokens of one prompt, alone, end of sequence ignored."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return engines["off"].generate([prompt], params)[0].token_ids


@pytest.mark.kernel_paths
@fuzz_settings(ci=5)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    max_tokens=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_greedy_tokens_equal_the_plain_pytorch_path(
    engines: dict[str, LLM], lengths: list[int], max_tokens: int, seed: int
) -> None:
    prompts = [_ids(n, seed + i) for i, n in enumerate(lengths)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    fast = engines["on"].generate(prompts, params)
    plain = engines["off"].generate(prompts, params)
    for i, (f, p) in enumerate(zip(fast, plain, strict=True)):
        assert f.error is None and p.error is None
        assert f.token_ids == p.token_ids, f"prompt {i} of {lengths}: optimized {f.token_ids}, plain {p.token_ids}"
        assert len(f.token_ids) == min(max_tokens, MAX_LEN - lengths[i]) and f.finish_reason == "length"


PROMPT_KINDS = ["ok", "ok", "ok", "empty", "too_long", "out_of_vocab", "negative", "float", "none", "bool"]


def _prompt(kind: str, n: int, seed: int) -> Any:
    ids = _ids(n, seed)
    return {
        "ok": ids,
        "empty": [],
        "too_long": _ids(MAX_LEN, seed),
        "out_of_vocab": [*ids, VOCAB],
        "negative": [-1, *ids],
        "float": [1.5, *ids],
        "none": None,
        "bool": [True, *ids],
    }[kind]


@fuzz_settings(ci=10)
@given(
    kinds=st.lists(st.sampled_from(PROMPT_KINDS), min_size=1, max_size=3),
    n=st.integers(1, 6),
    params_kind=st.sampled_from(["one", "one", "per_prompt", "too_few", "dict", "none"]),
    engine=st.sampled_from(["on", "off"]),
    streaming=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_generate_with_hostile_prompts(
    engines: dict[str, LLM], kinds: list[str], n: int, params_kind: str, engine: str, streaming: bool, seed: int
) -> None:
    llm = engines[engine]
    prompts = [_prompt(kind, n, seed + i) for i, kind in enumerate(kinds)]
    one = SamplingParams(max_tokens=3, ignore_eos=True)
    params: Any = {
        "one": one,
        "per_prompt": [one] * len(prompts),
        "too_few": [one] * (len(prompts) - 1),
        "dict": {"max_tokens": 3},
        "none": None,
    }[params_kind]
    call_ok = all(k not in ("float", "none", "bool") for k in kinds) and params_kind in ("one", "per_prompt", "none")
    runnable = [k == "ok" for k in kinds]
    if streaming:  # one prompt, streamed: the request's own error is raised
        if params_kind not in ("one", "none"):
            return
        outcome = check_call(
            lambda: list(llm.stream(prompts[0], params)),
            None,
            arguments=["prompt", "token ids", "max_model_len", "context"],
            name="stream",
        )
        assert outcome.raised != runnable[0], f"{kinds[0]}: {outcome.error!r}"
        if not outcome.raised and params_kind == "one":
            assert outcome.result == _plain_greedy(engines, prompts[0], 3)
        return
    outcome = check_call(
        lambda: llm.generate(prompts, params),
        None,
        arguments=["prompts", "prompt", "params", "SamplingParams", "token ids"],
        name="generate",
    )
    assert outcome.raised != call_ok, f"{kinds}, {params_kind}: {outcome.error!r}"
    if outcome.raised:
        return
    for i, (completion, ok) in enumerate(zip(outcome.result, runnable, strict=True)):
        if not ok:  # fails alone, with a typed error that says why
            assert completion.finish_reason == "error" and completion.token_ids == []
            assert isinstance(completion.error, ValueError | MemoryError), repr(completion.error)
            continue
        assert completion.error is None, f"prompt {i}: {completion.error!r}"
        if params_kind != "none":  # the default parameters stop at the model's end of sequence
            assert completion.token_ids == _plain_greedy(engines, prompts[i], 3), f"prompt {i} of {kinds}"


PARAM_VALUES: dict[str, tuple[list[Any], list[Any]]] = {  # (valid, hostile)
    "max_tokens": ([1, 3, 2**40], [0, -1, 1.5, None, True]),
    "temperature": ([0.0, 1e-45, 1e-300, 1e-3, 0.8, 1e30], [-0.1, math.nan, math.inf, "1", None]),
    "top_k": ([0, 1, 3, VOCAB, 2**70], [-1, 1.5, "2", None, True]),
    "top_p": ([1.0, 1e-30, 0.5, 0.9], [0.0, 1.5, math.nan, "0.5", None]),
    "stop_token_ids": ([(), (3,), 4, [5, 6]], [None, (-1,), (1.5,), "3"]),
    "ignore_eos": ([True, False], [None, 1, "no"]),
    "seed": ([None, 0, 7, 2**64 - 1], [-1, 2**64, 1.5, "3", True]),
}


@st.composite
def sampling_kwargs(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """Valid values for some fields and, in about a third of the draws, one hostile field."""
    kwargs = {name: draw(st.sampled_from(valid)) for name, (valid, _) in PARAM_VALUES.items() if draw(st.booleans())}
    bad = draw(st.one_of(st.none(), st.none(), st.sampled_from(sorted(PARAM_VALUES))))
    if bad is not None:
        kwargs[bad] = draw(st.sampled_from(PARAM_VALUES[bad][1]))
    return kwargs, bad is None


@fuzz_settings(ci=20)
@given(drawn=sampling_kwargs(), engine=st.sampled_from(["on", "off"]), n=st.integers(1, 6), seed=st.integers(0, 99))
def test_hostile_sampling_parameters(
    engines: dict[str, LLM], drawn: tuple[dict[str, Any], bool], engine: str, n: int, seed: int
) -> None:
    kwargs, valid = drawn
    kwargs.setdefault("max_tokens", 3)
    kwargs["max_tokens"] = min(kwargs["max_tokens"], 4) if type(kwargs["max_tokens"]) is int else kwargs["max_tokens"]
    outcome = check_call(lambda: SamplingParams(**kwargs), None, arguments=list(kwargs), name="SamplingParams")
    assert outcome.raised != valid, f"{kwargs}: {outcome.error!r}"
    if outcome.raised:
        return
    params: SamplingParams = outcome.result
    prompt = _ids(n, seed)
    llm = engines[engine]
    (completion,) = llm.generate([prompt], params)
    tokens = completion.token_ids
    assert completion.error is None and 1 <= len(tokens) <= params.max_tokens
    assert all(0 <= t < VOCAB for t in tokens)
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(EOS))
    assert not stops & set(tokens[:-1]), "generation went on past a stop token"
    if completion.finish_reason == "stop":
        assert tokens[-1] in stops
    else:
        assert completion.finish_reason == "length" and len(tokens) == params.max_tokens
    only_argmax = params.greedy or params.top_k == 1 or params.top_p <= 1e-6 or params.temperature <= 1e-30
    if only_argmax:
        assert tokens == _plain_greedy(engines, prompt, 4)[: len(tokens)]
    if params.seed is not None:
        assert llm.generate([prompt], params)[0].token_ids == tokens, "a seeded request must be reproducible"


LLM_ARGS: dict[str, tuple[list[Any], list[Any]]] = {  # (valid, hostile)
    "max_model_len": ([None, 8], [0, -5, 1.5, "8"]),
    "max_batch_size": ([2], [0, -1, 2.5, None]),
    "page_size": ([4], [0, -1, "16", None]),
    "num_blocks": ([None, 16], [0, -3, 1.5]),
    "max_num_batched_tokens": ([64], [0, -1, None, 1.5]),
    "seed": ([0, 5], [-1, "a", 1.5]),
    "device": (["cpu", torch.device("cpu")], ["tpu", "cuda:x", 3.5]),
    "dtype": ([torch.float32], [torch.int8, "float16", torch.float64, 1]),
    "flags": ([EngineFlags.all_off()], [{"paged_kv": False}, "all_off", 1]),
}


@fuzz_settings(ci=12)
@given(name=st.sampled_from(sorted(LLM_ARGS)), pick=st.integers(0, 9), hostile=st.integers(0, 3))
def test_llm_constructor_arguments(loaded: LoadedModel, name: str, pick: int, hostile: int) -> None:
    valid_values, bad_values = LLM_ARGS[name]
    valid = hostile == 0  # a quarter of the draws build an engine (slow): the rest must refuse at once
    value = valid_values[pick % len(valid_values)] if valid else bad_values[pick % len(bad_values)]
    kwargs: dict[str, Any] = {"device": "cpu", "max_model_len": 8, "max_batch_size": 2, name: value}
    outcome = check_call(lambda: LLM(loaded, **kwargs), None, arguments=[name], name=f"LLM({name}={value!r})")
    assert outcome.raised != valid, f"{name}={value!r}: {outcome.error!r}"
    if not outcome.raised:
        (completion,) = outcome.result.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True))
        assert completion.error is None and len(completion.token_ids) == 2


@fuzz_settings(ci=20)
@given(
    name=st.sampled_from(list(FLAG_NAMES)),
    value=st.sampled_from([True, False, 1, 0, None, "yes"]),
    method=st.sampled_from(["init", "without", "with_only"]),
    flag=st.sampled_from([*FLAG_NAMES, "paged", "", "TENSOR_CORES"]),
)
def test_engine_flags(name: str, value: Any, method: str, flag: str) -> None:
    calls: dict[str, Callable[[], object]] = {
        "init": lambda: EngineFlags(**{name: value}),
        "without": lambda: EngineFlags().without(flag),
        "with_only": lambda: EngineFlags().with_only(flag),
    }
    outcome = check_call(calls[method], None, arguments=[name, "flag"], name=method)
    valid = isinstance(value, bool) if method == "init" else flag in FLAG_NAMES
    assert outcome.raised != valid
