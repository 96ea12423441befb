"""Fuzzing batching and serving with hostile arguments (see ``llamatelemetry_core.testing.fuzz``).

* :class:`BatchConfig`: every field with hostile values; a bad one raises a typed error naming the field.
* ``batch_infer``: hostile prompt lists (non-strings, empty, containers that are not lists) and small configs,
  with one-prompt, list (:func:`batched`) and ``async`` functions, through ``batch_infer`` and ``abatch_infer``,
  some prompts failing: results in prompt order, each equal to the function's answer, failures reported by
  index, never lost.
* Every block manager of ``conftest.BLOCK_MANAGERS`` with hostile ids, tokens and counts: a refused call changes
  nothing.
* The continuous-batching engine: ``submit`` with hostile prompts and hostile sampling parameters (temperature,
  top-k, top-p, repetition penalty, max tokens, seeds, stop tokens and strings) over the deterministic
  :class:`~llamatelemetry_batch.serving.testing.HashDecoder`: greedy output equals the model's known
  continuation, output that can only be the arg-max (top-k 1, a vanishing temperature or top-p) equals it too,
  seeded output is reproducible, and every request ends for the reason its parameters give.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llamatelemetry_batch import (
    BatchConfig,
    BatchInferenceError,
    BatchInferenceOptimizer,
    OversizePromptWarning,
    batched,
)
from llamatelemetry_batch.serving import (
    ContinuousBatchingEngine,
    FinishReason,
    RequestOutput,
    SamplingParams,
    SimpleBlockManager,
    TokenBudget,
)
from llamatelemetry_batch.serving.testing import HashDecoder
from llamatelemetry_core.testing.fuzz import check_call, fuzz_settings

pytestmark = pytest.mark.usefixtures("single_thread_torch")

VOCAB, MAX_LEN = 31, 24

HOSTILE = st.one_of(
    st.sampled_from([None, True, False, 0, 1, -1, 2**70, 0.0, 0.5, 1.5, -0.5, "1", "tqdm", b"x", (), [1]]),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e-300, 1e300, (ValueError,), (1,), ValueError, len]),
)

# --- BatchConfig ----------------------------------------------------------------------------------------------------


def _config_field_valid(name: str, value: object) -> bool:
    """What each field's documentation accepts."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_real = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    defaults = BatchConfig()
    if name in ("max_batch_size", "max_tokens"):
        return is_int and value > 0  # type: ignore[operator]
    if name in ("dynamic_batching", "stop_on_error"):
        return isinstance(value, bool)
    if name == "timeout":
        return value is None or (is_real and value > 0)  # type: ignore[operator]
    if name == "max_retries":
        return is_int and value >= 0  # type: ignore[operator]
    if name == "retry_backoff":
        return is_real and 0 <= value <= defaults.retry_backoff_max  # type: ignore[operator]
    if name == "retry_backoff_max":
        return is_real and value >= defaults.retry_backoff  # type: ignore[operator]
    if name == "retry_jitter":
        return is_real and 0 <= value <= 1  # type: ignore[operator]
    if name == "retry_on":
        if value is None or (callable(value) and not isinstance(value, type)):
            return True
        return isinstance(value, tuple) and all(isinstance(t, type) and issubclass(t, BaseException) for t in value)
    if name == "progress":
        return isinstance(value, bool) or value in ("tqdm", "rich")
    if name == "token_estimator":
        return value is None or callable(value)
    raise AssertionError(f"a BatchConfig field without a rule: {name}")


@fuzz_settings(ci=60)
@given(name=st.sampled_from([f.name for f in dataclasses.fields(BatchConfig)]), value=HOSTILE)
def test_batch_config_fields_take_what_they_document(name: str, value: object) -> None:
    kwargs: dict[str, Any] = {name: value}
    outcome = check_call(lambda: BatchConfig(**kwargs), None, arguments=[name], name=f"BatchConfig({name}=)")
    assert outcome.raised != _config_field_valid(name, value), f"{name}={value!r}: {outcome.error!r}"


# --- batch_infer ----------------------------------------------------------------------------------------------------

PROMPT = st.one_of(
    st.text(alphabet="ab", max_size=6), st.text(alphabet="ab", max_size=6), st.sampled_from(["!", "a!b"])
)


@st.composite
def prompt_lists(draw: st.DrawFn) -> list[Any]:
    """Up to six prompts (some failing); in about a quarter of the draws, one of them not a string."""
    prompts: list[Any] = draw(st.lists(PROMPT, max_size=6))
    if prompts and draw(st.integers(0, 3)) == 0:
        prompts[draw(st.integers(0, len(prompts) - 1))] = draw(st.sampled_from([None, 1, 1.5, b"ab", ["a"], True]))
    return prompts


def _answer(prompt: str) -> str:
    if "!" in prompt:
        raise ValueError(f"the function refuses {prompt!r}")  # a prompt that fails for good (not transient)
    return prompt[::-1] + str(len(prompt))


async def _async_answer(prompt: str) -> str:
    return _answer(prompt)


@batched
def _list_answer(prompts: list[str]) -> list[str]:
    return [_answer(p) for p in prompts]


@fuzz_settings(ci=40)
@given(
    prompts=prompt_lists(),
    container=st.sampled_from(["list", "list", "list", "tuple", "generator", "str", "dict", "none"]),
    kind=st.sampled_from(["one", "list", "async"]),
    awaited=st.booleans(),
    max_batch_size=st.integers(1, 3),
    max_tokens=st.integers(1, 6),
    dynamic=st.booleans(),
    stop_on_error=st.booleans(),
)
def test_batch_infer_keeps_every_prompt_in_order(
    prompts: list[Any],
    container: str,
    kind: str,
    max_batch_size: int,
    max_tokens: int,
    dynamic: bool,
    stop_on_error: bool,
    awaited: bool,
) -> None:
    config = BatchConfig(
        max_batch_size=max_batch_size,
        max_tokens=max_tokens,
        dynamic_batching=dynamic,
        max_retries=0,
        stop_on_error=stop_on_error,
    )
    optimizer = BatchInferenceOptimizer(config)
    given_prompts: Any = {
        "list": prompts,
        "tuple": tuple(prompts),
        "generator": (p for p in prompts),
        "str": "ab",
        "dict": dict.fromkeys(range(len(prompts)), "a"),
        "none": None,
    }[container]
    functions: dict[str, Callable[..., Any]] = {"one": _answer, "list": _list_answer, "async": _async_answer}
    fn = functions[kind]

    def call() -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OversizePromptWarning)  # a prompt over max_tokens runs alone
                if awaited:  # abatch_infer, from a running event loop
                    return asyncio.run(optimizer.abatch_infer(given_prompts, fn))
                return optimizer.batch_infer(given_prompts, fn)
        except BatchInferenceError as exc:
            return exc  # some prompts failed: judged below, with the results it carries

    outcome = check_call(call, None, arguments=["prompts", "prompt"], name="batch_infer")
    strings = container in ("list", "tuple", "generator") and all(isinstance(p, str) for p in prompts)
    assert outcome.raised != strings, f"{container} of {prompts!r}: {outcome.error!r}"
    if outcome.raised:
        return
    failing = [i for i, p in enumerate(prompts) if "!" in p]
    if not failing:
        assert outcome.result == [_answer(p) for p in prompts]
        return
    error = outcome.result
    assert isinstance(error, BatchInferenceError), f"prompts {failing} fail, but batch_infer returned {error!r}"
    assert len(error.results) == len(prompts)
    for i, prompt in enumerate(prompts):  # each prompt is answered, failed or not run: exactly one of them
        states = [
            error.results[i] == _answer(prompt) if "!" not in prompt else False,
            i in error.errors,
            i in error.not_run,
        ]
        assert sum(states) == 1, f"prompt {i}: answered/failed/not run = {states}"
        if i in error.errors:
            assert error.results[i] is None and isinstance(error.errors[i], ValueError)
            assert "!" in str(error.errors[i]), "a failure carries the error of a prompt that fails"
    if not stop_on_error:
        assert set(error.errors) == set(failing) and not error.not_run
    elif kind != "list":  # a list function's batch fails as a whole when stopping at the first failure
        assert set(error.errors) <= set(failing)


# --- the continuous-batching engine ---------------------------------------------------------------------------------


def _letters(token_ids: Sequence[int]) -> str:
    """A toy detokenizer: token ``t`` is one letter."""
    return "".join(chr(ord("a") + t % 26) for t in token_ids)


VALID_PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "max_new_tokens": st.sampled_from([1, 3, 8, 2**40]),
    "temperature": st.sampled_from([0.0, 0.0, 1e-45, 1e-300, 1e-3, 0.7, 1.0, 50.0, 1e30]),
    "top_k": st.sampled_from([0, 0, 1, 2, 5, VOCAB, 2**70]),
    "top_p": st.sampled_from([1.0, 1.0, 1e-30, 0.05, 0.5, 0.9]),
    "repetition_penalty": st.sampled_from([1.0, 1.0, 1e-30, 0.5, 1.3, 1e30]),
    "seed": st.sampled_from([None, 0, 7, 2**63, 2**64 - 1]),
    "stop_token_ids": st.sampled_from([(), (3,), (0, 5, 9), 4, 2**70]),
    "stop": st.sampled_from([(), ("c",), ("ab", "q"), "d"]),
    "ignore_eos": st.booleans(),
}
BAD_PARAMS: dict[str, st.SearchStrategy[Any]] = {
    "max_new_tokens": st.sampled_from([0, -1, 1.5, None, True]),
    "temperature": st.sampled_from([-0.1, math.nan, math.inf, "1", None, True]),
    "top_k": st.sampled_from([-1, 1.5, None, True]),
    "top_p": st.sampled_from([0.0, 1.5, -0.2, math.nan, "0.5", None]),
    "repetition_penalty": st.sampled_from([0.0, -1.0, math.inf, None, True]),
    "seed": st.sampled_from([-1, 2**64, 1.5, "3", True]),
    "stop_token_ids": st.sampled_from([None, (-1,), (1.5,), "3", (True,)]),
    "stop": st.sampled_from([None, ("",), (3,), b"x"]),
    "ignore_eos": st.sampled_from([None, 1, "no"]),
}


@st.composite
def sampling_kwargs(draw: st.DrawFn) -> dict[str, Any]:
    """Valid values for some fields; in about a third of the draws, one field hostile."""
    kwargs = draw(st.fixed_dictionaries({}, optional=VALID_PARAMS))
    bad = draw(st.sampled_from([None, None, *sorted(BAD_PARAMS)]))
    if bad is not None and draw(st.integers(0, 2)) == 0:
        kwargs[bad] = draw(BAD_PARAMS[bad])
    return kwargs


def _param_valid(name: str, v: Any) -> bool:
    is_int = isinstance(v, int) and not isinstance(v, bool)
    is_real = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    rules: dict[str, Callable[[], bool]] = {
        "max_new_tokens": lambda: is_int and v > 0,
        "temperature": lambda: is_real and v >= 0,
        "top_k": lambda: is_int and v >= 0,
        "top_p": lambda: is_real and 0 < v <= 1,
        "repetition_penalty": lambda: is_real and v > 0,
        "seed": lambda: v is None or (is_int and 0 <= v < 2**64),
        "stop_token_ids": lambda: (
            (is_int and v >= 0) or (isinstance(v, tuple) and all(type(t) is int and t >= 0 for t in v))
        ),
        "stop": lambda: (
            (isinstance(v, str) and v != "") or (isinstance(v, tuple) and all(isinstance(s, str) and s for s in v))
        ),
        "ignore_eos": lambda: isinstance(v, bool),
    }
    return rules[name]()


def _greedy_only(params: SamplingParams) -> bool:
    """Whether sampling can only pick the arg-max: HashDecoder's arg-max leads the next logit by 1 or more."""
    return params.repetition_penalty == 1.0 and (
        params.greedy or params.top_k == 1 or params.temperature <= 1e-3 or params.top_p <= 1e-6
    )


def _run(params: SamplingParams, prompts: list[list[int]], eos: tuple[int, ...]) -> list[RequestOutput]:
    model = HashDecoder(vocab_size=VOCAB, max_model_len=MAX_LEN, one_hot=False)
    engine = ContinuousBatchingEngine(model, eos_token_ids=eos, detokenize=_letters)
    handles = [engine.submit(p, params) for p in prompts]
    while engine.has_unfinished:
        engine.step()
    return [h.result() for h in handles]


@fuzz_settings(ci=60)
@given(
    kwargs=sampling_kwargs(),
    prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=MAX_LEN - 1),
    eos=st.sampled_from([(), (2,), (5, 11)]),
)
def test_submit_with_hostile_sampling_parameters(
    kwargs: dict[str, Any], prompt: list[int], eos: tuple[int, ...]
) -> None:
    outcome = check_call(lambda: SamplingParams(**kwargs), None, arguments=list(kwargs), name="SamplingParams")
    valid = all(_param_valid(name, value) for name, value in kwargs.items())
    assert outcome.raised != valid, f"{kwargs}: {outcome.error!r}"
    if outcome.raised:
        return
    params: SamplingParams = outcome.result
    other = [(t * 7 + 1) % VOCAB for t in prompt[:5]]  # a second request in the same batch
    first, neighbour = _run(params, [prompt, other], eos)
    model = HashDecoder(vocab_size=VOCAB, max_model_len=MAX_LEN)
    for out, p in ((first, prompt), (neighbour, other)):
        tokens = list(out.output_token_ids)
        assert out.error is None and out.finished
        assert 1 <= len(tokens) <= min(params.max_new_tokens, MAX_LEN - len(p))
        assert all(0 <= t < VOCAB for t in tokens)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
        assert not stops & set(tokens[:-1]), "generation went on past a stop token"
        text = _letters(tokens)
        if out.finish_reason is FinishReason.LENGTH:
            assert len(tokens) == min(params.max_new_tokens, MAX_LEN - len(p))
        else:
            assert out.finish_reason is FinishReason.STOP
            assert tokens[-1] in stops or any(s in text for s in params.stop)
        if out.text is not None and params.stop:
            assert not any(s in out.text for s in params.stop), "the text must be cut before a stop string"
        if _greedy_only(params):
            expected = model.expected_greedy(p, len(tokens))
            assert tokens == expected, f"expected the arg-max continuation {expected}, got {tokens}"
    if params.seed is not None:
        again, _ = _run(params, [prompt, other], eos)
        assert again.output_token_ids == first.output_token_ids, "a seeded request must be reproducible"


PROMPTS = st.one_of(
    st.lists(st.integers(-2, VOCAB + 1), max_size=4),
    st.lists(st.sampled_from([1.5, "a", None, True, 2**70]), min_size=1, max_size=2),
    st.sampled_from([None, "ab", 3, list(range(MAX_LEN)), list(range(MAX_LEN - 1))]),
)


@fuzz_settings(ci=40)
@given(prompt=PROMPTS, params=st.sampled_from([None, "params", {"temperature": 1.0}, 3]))
def test_submit_hostile_prompts(prompt: Any, params: Any) -> None:
    engine = ContinuousBatchingEngine(HashDecoder(vocab_size=VOCAB, max_model_len=MAX_LEN))
    sampling = SamplingParams(max_new_tokens=2) if params == "params" else params
    outcome = check_call(
        lambda: engine.submit(prompt, sampling),
        None,
        arguments=["prompt_token_ids", "token ids", "prompt", "params", "max_model_len"],
        name="submit",
    )
    valid = (
        isinstance(prompt, list)
        and 0 < len(prompt) < MAX_LEN
        and all(type(t) is int and 0 <= t < VOCAB for t in prompt)
        and (params is None or params == "params")
    )
    assert outcome.raised != valid, f"{prompt!r}, {params!r}: {outcome.error!r}"
    if outcome.raised:
        assert not engine.has_unfinished, "a refused request must not be queued"
    else:
        output = outcome.result.result()
        assert output.prompt_token_ids == tuple(prompt) and output.finished and output.error is None


# --- block managers (every implementation in conftest.BLOCK_MANAGERS) -----------------------------------------------

HOSTILE_IDS = st.one_of(st.sampled_from([0, 1, 2]), st.sampled_from([-1, 2**63, "0", None, 1.5]))
HOSTILE_TOKENS = st.one_of(
    st.lists(st.integers(0, 5), max_size=4),
    st.lists(st.one_of(st.integers(-2, 5), st.sampled_from([1.5, "a", None, True])), min_size=1, max_size=3),
    st.sampled_from([None, "abc", 3, b"ab"]),
)
HOSTILE_COUNTS = st.one_of(st.integers(-2, 9), st.sampled_from([1.5, "1", None, True]))


def _manager_state(manager: Any) -> tuple[object, ...]:
    return manager.num_free_blocks, [(manager.num_tokens(s), manager.block_table(s)) for s in (0, 1)]


@fuzz_settings(ci=40)
@given(
    method=st.sampled_from(["allocate", "can_allocate", "append", "append_decode", "can_append", "free", "num_tokens"]),
    seq_id=HOSTILE_IDS,
    tokens=HOSTILE_TOKENS,
    count=HOSTILE_COUNTS,
    ids=st.lists(HOSTILE_IDS, max_size=3),
)
def test_block_managers_refuse_hostile_arguments(
    block_manager_factory: Callable[[int, int], Any],
    method: str,
    seq_id: Any,
    tokens: Any,
    count: Any,
    ids: list[Any],
) -> None:
    manager = block_manager_factory(6, 2)
    manager.allocate(0, [1, 2, 3])
    manager.allocate(1, [4])
    calls: dict[str, Callable[[], object]] = {
        "allocate": lambda: manager.allocate(seq_id, tokens),
        "can_allocate": lambda: manager.can_allocate(tokens),
        "append": lambda: manager.append(seq_id, tokens),
        "append_decode": lambda: manager.append_decode(ids, tokens),
        "can_append": lambda: manager.can_append(seq_id, count),
        "free": lambda: manager.free(seq_id),
        "num_tokens": lambda: manager.num_tokens(seq_id),
    }
    before = _manager_state(manager)
    keys = [repr(x) for x in (seq_id, *ids)] + [str(x) for x in (seq_id, *ids)]  # a KeyError names the key
    outcome = check_call(
        calls[method],
        None,
        arguments=["seq_id", "token_ids", "num_tokens", "sequence", *keys],
        documented=(KeyError,),
        name=method,
    )
    if outcome.raised:
        if method != "free" or not isinstance(outcome.error, KeyError):
            assert _manager_state(manager) == before, f"{method} raised {outcome.error!r} but changed the manager"
        return
    plain_tokens = isinstance(tokens, list) and all(type(t) is int and t >= 0 for t in tokens)
    # Counting managers read how many tokens they get, not their values; the others hash them, and a decode
    # step's tokens are checked by every manager (core's check_decode_step).
    counting = isinstance(manager, SimpleBlockManager | TokenBudget)
    if method == "append_decode" or (method in ("allocate", "append") and not counting):
        assert plain_tokens, f"{method} accepted token_ids={tokens!r}"
    if method in ("allocate", "append", "can_allocate"):
        assert isinstance(tokens, list), f"{method} accepted token_ids={tokens!r}"
    if method == "can_append":
        assert type(count) is int and count >= 0, f"can_append accepted num_tokens={count!r}"
