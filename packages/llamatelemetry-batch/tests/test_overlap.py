"""The engine with ``overlap=True``: each step is launched with the previous step's tokens still on the device.

Whatever the workload (stops, stop strings, length limits, preemption, seeded sampling, repetition penalties,
cancellation, failing callbacks), the outputs equal those of the engine without overlap, no stand-in token is
ever streamed or returned, and the block manager never keeps a stand-in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamatelemetry_batch.serving import (
    ContinuousBatchingEngine,
    FinishReason,
    RequestOutput,
    SamplingParams,
    SchedulerConfig,
    SimpleBlockManager,
    TokenBudget,
)
from llamatelemetry_batch.serving.testing import HashDecoder, PrefixCachingBlockManager, TinyDecoder
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.serving import KVBlockManager, SequenceStep, StepInput, TokenFeed
from llamatelemetry_core.testing.fuzz import fuzz_settings

pytestmark = pytest.mark.usefixtures("single_thread_torch")

VOCAB, MAX_LEN = 29, 40
# The managers that take stand-in tokens (conftest's, but the test-only prefix-caching one, which hashes a block
# the moment it fills).
BLOCK_MANAGERS: dict[str, Callable[[int, int], KVBlockManager]] = {"simple": SimpleBlockManager}
try:  # the paged cache's own manager, when that component is installed (never a dependency of this package)
    from llamatelemetry_kvcache import BlockManager as KVCacheBlockManager
except ImportError:  # pragma: no cover - llamatelemetry-kvcache absent
    pass
else:
    BLOCK_MANAGERS["kvcache"] = KVCacheBlockManager
OVERLAP_MANAGERS = sorted(BLOCK_MANAGERS)


def _on_device(engine: ContinuousBatchingEngine) -> bool:
    """Whether sampled tokens wait on the device to be read back."""
    return bool(engine._pendings)


def _fail_one_step(engine: ContinuousBatchingEngine, model: HashDecoder) -> None:
    """Run one engine step whose model step raises (a lost device), then give the model back."""
    original = model.step

    def broken(batch: StepInput) -> torch.Tensor:
        raise RuntimeError("device lost")

    model.step = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="device lost"):
            engine.step()
    finally:
        model.step = original  # type: ignore[method-assign]


def _letters(token_ids: Sequence[int]) -> str:
    return "".join(chr(ord("a") + t % 26) for t in token_ids)


def _run(
    overlap: bool,
    manager: str | None,
    requests: list[tuple[list[int], SamplingParams]],
    *,
    cancel_at: int | None = None,
    num_blocks: int = 12,
    max_num_seqs: int = 3,
    eos: tuple[int, ...] = (3,),
) -> tuple[list[RequestOutput], list[list[int]], int, ContinuousBatchingEngine]:
    """Outputs, the tokens each request streamed, and the steps whose tokens were read back late."""
    page = 4 if manager is not None else None
    model = HashDecoder(
        vocab_size=VOCAB, max_model_len=MAX_LEN, page_size=page, num_blocks=num_blocks, one_hot=False,
        token_feed=True,
    )  # fmt: skip
    block_manager: KVBlockManager | None = BLOCK_MANAGERS[manager](num_blocks, 4) if manager is not None else None
    engine = ContinuousBatchingEngine(
        model, block_manager, scheduler_config=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=16),
        eos_token_ids=eos, detokenize=_letters, overlap=overlap,
    )  # fmt: skip
    streamed: list[list[int]] = [[] for _ in requests]
    handles = []
    for index, (prompt, params) in enumerate(requests):

        def on_token(token: int | None, _: str, index: int = index) -> None:
            if token is not None:
                streamed[index].append(token)

        handles.append(engine.submit(prompt, params, on_token=on_token))
    deferred = 0
    while engine.has_unfinished:
        before = engine._pendings[-1] if engine._pendings else None
        engine.step()
        deferred += bool(engine._pendings) and engine._pendings[-1] is not before
        if cancel_at is not None and engine.num_steps == cancel_at:
            handles[0].cancel()
    assert not engine._pendings, "tokens left on the device after the last request finished"
    return [h.result() for h in handles], streamed, deferred, engine


def _params(draw: st.DrawFn) -> SamplingParams:
    kind = draw(st.sampled_from(["greedy", "seeded", "penalty", "stops"]))
    max_new = draw(st.integers(1, 12))
    if kind == "greedy":
        return SamplingParams(max_new_tokens=max_new, ignore_eos=draw(st.booleans()))
    if kind == "seeded":
        return SamplingParams(max_new_tokens=max_new, temperature=0.8, top_k=5, seed=draw(st.integers(0, 99)))
    if kind == "penalty":
        return SamplingParams(max_new_tokens=max_new, repetition_penalty=1.3)
    stop_token = draw(st.integers(0, VOCAB - 1))
    return SamplingParams(
        max_new_tokens=max_new, stop_token_ids=(stop_token,), stop=(draw(st.sampled_from(["ab", "c"])),)
    )


@st.composite
def workloads(draw: st.DrawFn) -> list[tuple[list[int], SamplingParams]]:
    count = draw(st.integers(1, 5))
    return [(draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=14)), _params(draw)) for _ in range(count)]


@fuzz_settings(ci=30)
@given(
    requests=workloads(),
    manager=st.sampled_from([None, *OVERLAP_MANAGERS]),
    num_blocks=st.sampled_from([6, 12, 40]),
    cancel_at=st.sampled_from([None, 2, 5]),
)
def test_overlap_gives_the_same_outputs(
    requests: list[tuple[list[int], SamplingParams]], manager: str | None, num_blocks: int, cancel_at: int | None
) -> None:
    if manager is not None and max(len(p) + s.max_new_tokens for p, s in requests) > num_blocks * 4:
        num_blocks = 40  # every request must fit alone
    plain, plain_streamed, plain_deferred, _ = _run(
        False, manager, requests, num_blocks=num_blocks, cancel_at=cancel_at
    )
    over, over_streamed, _, _ = _run(True, manager, requests, num_blocks=num_blocks, cancel_at=cancel_at)
    assert plain_deferred == 0
    for a, b, sa, sb in zip(plain, over, plain_streamed, over_streamed, strict=True):
        if cancel_at is not None and a.request_id == plain[0].request_id:
            # Cancelled at the same step count: with overlap the last tokens may still have been on the device.
            assert b.finish_reason is FinishReason.CANCELLED or b.finish_reason == a.finish_reason
            assert a.output_token_ids[: len(b.output_token_ids)] == b.output_token_ids
            assert list(b.output_token_ids) == sb
            continue
        assert (b.output_token_ids, b.finish_reason, b.text) == (a.output_token_ids, a.finish_reason, a.text)
        assert list(b.output_token_ids) == sb == sa, "streamed tokens must be the output, no stand-in among them"


def test_overlap_defers_decode_steps_and_reads_back_at_length_limits() -> None:
    requests = [([1, 2, 3], SamplingParams(max_new_tokens=9, ignore_eos=True)) for _ in range(3)]
    plain, _, _, _ = _run(False, "simple", requests)
    over, _, deferred, engine = _run(True, "simple", requests)
    assert [o.output_token_ids for o in over] == [o.output_token_ids for o in plain]
    assert all(o.finish_reason is FinishReason.LENGTH and len(o.output_token_ids) == 9 for o in over)
    # Every step but the last (which ends the requests by length) leaves its tokens on the device.
    assert deferred == engine.num_steps - 1


def test_a_request_stopped_on_the_device_runs_one_more_step_whose_token_is_dropped() -> None:
    model = HashDecoder(vocab_size=VOCAB, max_model_len=MAX_LEN, token_feed=True)
    prompt = [4, 5, 6]
    continuation = model.expected_greedy(prompt, 8)
    stop = continuation[3]
    expected = model.expected_greedy(prompt, 8, stop_token_ids=(stop,))
    engine = ContinuousBatchingEngine(model, overlap=True)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))[0]
    assert list(out.output_token_ids) == expected and out.finish_reason is FinishReason.STOP
    assert engine.num_steps == len(expected) + 1  # the step after the stop ran, and its token is not in the output


def test_a_failing_callback_ends_its_request_only() -> None:
    model = TinyDecoder(vocab_size=VOCAB, max_model_len=MAX_LEN, page_size=4, num_blocks=32, token_feed=True)
    engine = ContinuousBatchingEngine(model, SimpleBlockManager(32, 4), overlap=True)
    calls = []

    def bad(token: int | None, _: str) -> None:
        calls.append(token)
        if len(calls) == 3:
            raise ValueError("callback failed")

    failing = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=8, ignore_eos=True), on_token=bad)
    fine = engine.submit([7, 8], SamplingParams(max_new_tokens=8, ignore_eos=True))
    out_failing, out_fine = failing.result(), fine.result()
    assert out_failing.finish_reason is FinishReason.ERROR and isinstance(out_failing.error, ValueError)
    assert list(out_failing.output_token_ids) == calls
    assert out_fine.finish_reason is FinishReason.LENGTH and len(out_fine.output_token_ids) == 8
    reference = ContinuousBatchingEngine(
        TinyDecoder(vocab_size=VOCAB, max_model_len=MAX_LEN, page_size=4, num_blocks=32), SimpleBlockManager(32, 4)
    )
    expected = reference.generate([[7, 8]], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    assert out_fine.output_token_ids == expected.output_token_ids


def test_a_failing_model_step_hands_out_the_tokens_already_sampled() -> None:
    model = HashDecoder(vocab_size=VOCAB, max_model_len=MAX_LEN, token_feed=True)
    engine = ContinuousBatchingEngine(model, overlap=True)
    handle = engine.submit([1, 2], SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.step()  # prefill: its token stays on the device
    assert _on_device(engine)
    _fail_one_step(engine, model)
    assert not _on_device(engine) and handle.token_ids == model.expected_greedy([1, 2], 1)
    out = handle.result()  # the step is run again, now with the token on the host
    assert list(out.output_token_ids) == model.expected_greedy([1, 2], 6)


def test_overlap_needs_a_model_and_manager_that_take_stand_ins() -> None:
    with pytest.raises(ConfigurationError, match="accepts_token_feed"):
        ContinuousBatchingEngine(HashDecoder(), overlap=True)
    paged = HashDecoder(page_size=4, num_blocks=8, token_feed=True)
    with pytest.raises(ConfigurationError, match="replace_last_tokens"):
        ContinuousBatchingEngine(paged, PrefixCachingBlockManager(8, 4), overlap=True)
    with pytest.raises(ConfigurationError, match="overlap"):
        ContinuousBatchingEngine(HashDecoder(token_feed=True), overlap=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("manager", OVERLAP_MANAGERS)
def test_replace_last_tokens_checks_its_arguments(manager: str) -> None:
    bm = BLOCK_MANAGERS[manager](8, 4)
    bm.allocate(0, [1, 2, 3])
    bm.replace_last_tokens([0], [9])  # type: ignore[attr-defined]
    with pytest.raises(KeyError):
        bm.replace_last_tokens([5], [1])  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError):
        bm.replace_last_tokens([0], [-1])  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError):
        bm.replace_last_tokens([0, 0], [1, 2])  # type: ignore[attr-defined]
    budget = TokenBudget(8)
    budget.allocate(0, [1])
    budget.replace_last_tokens([0], [2])


def _feed_step(rows: tuple[int, ...], tokens: Any, lengths: tuple[int, ...] = (1, 1)) -> StepInput:
    steps = tuple(SequenceStep(i, (0,) * n, 3) for i, n in enumerate(lengths))
    return StepInput(steps, TokenFeed(tokens, rows))


def test_read_feed_puts_the_device_tokens_in_place_and_checks_the_feed() -> None:
    step = _feed_step((1, -1), torch.tensor([7, 8]))
    assert [s.token_ids for s in step.read_feed().sequences] == [(8,), (0,)]
    for rows, tokens, lengths, match in (
        ((0,), torch.tensor([1]), (1, 1), "one TokenFeed row per sequence"),
        ((2, -1), torch.tensor([1, 2]), (1, 1), "index below 2"),
        ((0, -1), torch.tensor([1.0]), (1, 1), "1-D int64"),
        ((0, -1), [1], (1, 1), "1-D int64"),
        ((0, -1), torch.tensor([1]), (2, 1), "only new token"),
    ):
        with pytest.raises(ConfigurationError, match=match):
            _feed_step(rows, tokens, lengths).read_feed()


class _InterruptOnce:
    """Stands for a step's copy on the host; reading it raises ``KeyboardInterrupt`` the first time (Ctrl-C while
    the engine waits for the device)."""

    def __init__(self, host: torch.Tensor) -> None:
        self.host, self.raised = host, False

    def tolist(self) -> list[int]:
        if not self.raised:
            self.raised = True
            raise KeyboardInterrupt
        values: list[int] = self.host.tolist()
        return values


def test_ctrl_c_while_reading_back_loses_no_token_and_caches_no_stand_in() -> None:
    manager = "kvcache" if "kvcache" in BLOCK_MANAGERS else "simple"
    model = HashDecoder(vocab_size=VOCAB, max_model_len=MAX_LEN, page_size=4, num_blocks=24, token_feed=True)
    engine = ContinuousBatchingEngine(model, BLOCK_MANAGERS[manager](24, 4), overlap=True)
    prompt = [1, 2, 3]
    handle = engine.submit(prompt, SamplingParams(max_new_tokens=10, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine._pendings[-1].host = _InterruptOnce(engine._pendings[-1].host)  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    out = handle.result()
    expected = model.expected_greedy(prompt, 10)
    assert list(out.output_token_ids) == expected and out.prompt_token_ids == tuple(prompt)
    # A request that reuses the cached prefix reads the K/V (here: chained hashes) of real tokens only.
    again = engine.generate([prompt + expected[:6]], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert list(again.output_token_ids) == model.expected_greedy(prompt + expected[:6], 3)


def test_ctrl_c_in_a_callback_loses_and_repeats_no_token() -> None:
    model = HashDecoder(vocab_size=VOCAB, max_model_len=MAX_LEN, page_size=4, num_blocks=24, token_feed=True)
    engine = ContinuousBatchingEngine(model, SimpleBlockManager(24, 4), overlap=True)
    streamed: dict[int, list[int]] = {0: [], 1: []}

    def on_token(index: int) -> Any:
        def callback(token: int | None, _: str) -> None:
            if token is None:
                return
            streamed[index].append(token)
            if index == 0 and len(streamed[0]) == 2 and not interrupted:
                interrupted.append(True)
                raise KeyboardInterrupt

        return callback

    interrupted: list[bool] = []
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    first = engine.submit([1, 2, 3], params, on_token=on_token(0))
    second = engine.submit([4, 5], params, on_token=on_token(1))

    def run_until_interrupted() -> None:
        while engine.has_unfinished:
            engine.step()

    with pytest.raises(KeyboardInterrupt):
        run_until_interrupted()
    a, b = first.result(), second.result()
    assert a.prompt_token_ids == (1, 2, 3) and list(a.output_token_ids) == model.expected_greedy([1, 2, 3], 6)
    assert list(b.output_token_ids) == model.expected_greedy([4, 5], 6)
    assert streamed == {0: list(a.output_token_ids), 1: list(b.output_token_ids)}


def test_outputs_finished_by_a_failing_step_come_back_from_the_next_one() -> None:
    model = HashDecoder(vocab_size=VOCAB, max_model_len=MAX_LEN, token_feed=True)
    prompt = [4, 5, 6]
    stop = model.expected_greedy(prompt, 1)[0]
    engine = ContinuousBatchingEngine(model, overlap=True)
    engine.submit(prompt, SamplingParams(max_new_tokens=5, stop_token_ids=(stop,)))
    engine.submit([7], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert engine.step() == []  # the prefill: its tokens (the first one a stop) are still on the device
    _fail_one_step(engine, model)
    outputs = engine.step()
    assert [o.finish_reason for o in outputs][:1] == [FinishReason.STOP]
    assert list(outputs[0].output_token_ids) == [stop]


@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_tokens_come_from_the_models_argmax(overlap: bool) -> None:
    # A model with an argmax method picks the greedy tokens (the overlapped step samples on the device, the plain
    # one reads back at once: both paths). This argmax picks the token after torch's choice, so every greedy
    # output shows it ran.
    calls: list[int] = []

    def shifted(logits: torch.Tensor) -> torch.Tensor:
        calls.append(logits.shape[0])
        return (logits.argmax(dim=-1) + 1) % logits.shape[-1]

    plain = HashDecoder(page_size=4, num_blocks=32, token_feed=True)
    model = HashDecoder(page_size=4, num_blocks=32, token_feed=True)
    model.argmax = shifted  # type: ignore[attr-defined]
    prompts = [[1, 2, 3], [4, 5]]
    greedy = SamplingParams(max_new_tokens=4, ignore_eos=True)
    want = [list(o.output_token_ids) for o in _generate(plain, prompts, greedy, overlap=False)]
    got = [list(o.output_token_ids) for o in _generate(model, prompts, greedy, overlap=overlap)]
    assert calls and got != want
    for prompt, out in zip(prompts, got, strict=True):  # each token is the shifted choice after its own history
        seq = list(prompt)
        for token in out:
            assert token == (plain.expected_greedy(seq, 1)[0] + 1) % 97
            seq.append(token)


def _generate(
    model: HashDecoder, prompts: list[list[int]], params: SamplingParams, *, overlap: bool
) -> list[RequestOutput]:
    engine = ContinuousBatchingEngine(model, SimpleBlockManager(32, 4), overlap=overlap)
    return engine.generate(prompts, params)


def test_an_argmax_that_is_not_callable_is_refused() -> None:
    model = HashDecoder()
    model.argmax = 3  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="argmax to be a method"):
        ContinuousBatchingEngine(model)
