"""The engine loop: streaming, metrics, stopping rules, cancellation, threads, asyncio and bad input."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest
import torch

from llamatelemetry_batch.serving import (
    ContinuousBatchingEngine,
    FinishReason,
    RequestOutput,
    SamplingParams,
    SchedulerConfig,
    SimpleBlockManager,
    TokenBudget,
)
from llamatelemetry_batch.serving.testing import HashDecoder, PrefixCachingBlockManager
from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.serving import StepInput

VOCAB = 61

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def _letters(token_ids: Sequence[int]) -> str:
    """A toy detokenizer: token t is one letter."""
    return "".join(chr(ord("a") + t % 26) for t in token_ids)


def _engine(**kwargs: object) -> tuple[ContinuousBatchingEngine, HashDecoder]:
    model = HashDecoder(vocab_size=VOCAB, max_model_len=64)
    return ContinuousBatchingEngine(model, **kwargs), model  # type: ignore[arg-type]


def test_generate_returns_outputs_in_prompt_order_with_per_prompt_params() -> None:
    engine, model = _engine()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
    params = [SamplingParams(max_new_tokens=n) for n in (5, 1, 3)]
    outputs = engine.generate(prompts, params)
    assert [o.prompt_token_ids for o in outputs] == [tuple(p) for p in prompts]
    for prompt, p, output in zip(prompts, params, outputs, strict=True):
        assert list(output.output_token_ids) == model.expected_greedy(prompt, p.max_new_tokens)
        assert output.finish_reason is FinishReason.LENGTH and output.finished and output.text is None
    with pytest.raises(ConfigurationError, match="one per prompt"):
        engine.generate(prompts, params[:2])
    with pytest.raises(ConfigurationError, match=r"prompt 1: expected a prompt of at least one token"):
        engine.generate([[1], [], [2]])
    assert not engine.has_unfinished, "a bad prompt stops the whole call before anything is queued"


def test_tokens_stream_through_callbacks_and_iterators_as_they_are_generated() -> None:
    engine, model = _engine()
    seen: list[tuple[int | None, str]] = []
    handle = engine.submit([9, 9], SamplingParams(max_new_tokens=4), on_token=lambda t, text: seen.append((t, text)))
    other = engine.submit([1, 2], SamplingParams(max_new_tokens=6))
    streamed = list(other)  # drives the engine in this thread, token by token
    assert streamed == model.expected_greedy([1, 2], 6) == list(other.result().output_token_ids)
    assert [t for t, _ in seen] == model.expected_greedy([9, 9], 4) == handle.token_ids
    assert all(text == "" for _, text in seen)


def test_metrics_time_the_first_token_and_the_gaps_between_tokens() -> None:
    class SlowModel(HashDecoder):
        def step(self, batch: StepInput) -> torch.Tensor:
            time.sleep(0.01)
            return super().step(batch)

    engine = ContinuousBatchingEngine(SlowModel(vocab_size=VOCAB))
    (output,) = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
    metrics = output.metrics
    assert metrics.time_to_first_token is not None and metrics.time_to_first_token >= 0.01
    assert metrics.queue_time is not None and 0 <= metrics.queue_time <= metrics.time_to_first_token
    assert len(metrics.inter_token_latencies) == 3 and min(metrics.inter_token_latencies) >= 0.01
    assert metrics.mean_inter_token_latency is not None and metrics.finished_time is not None


def test_end_of_sequence_and_stop_tokens_finish_a_request() -> None:
    engine, model = _engine(eos_token_ids=[])
    prompt = [1, 2, 3]
    free_run = model.expected_greedy(prompt, 8)
    stop_at = free_run[2]
    engine_eos, _ = _engine(eos_token_ids=[stop_at])
    (eos_out,) = engine_eos.generate([prompt], SamplingParams(max_new_tokens=8))
    assert list(eos_out.output_token_ids) == free_run[: free_run.index(stop_at) + 1]
    assert eos_out.finish_reason is FinishReason.STOP
    (ignored,) = engine_eos.generate([prompt], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert list(ignored.output_token_ids) == free_run and ignored.finish_reason is FinishReason.LENGTH
    (stopped,) = engine.generate([prompt], SamplingParams(max_new_tokens=8, stop_token_ids=(stop_at,)))
    assert stopped.output_token_ids == eos_out.output_token_ids and stopped.finish_reason is FinishReason.STOP


def test_stop_strings_cut_the_text_and_are_never_streamed() -> None:
    engine, model = _engine(detokenize=_letters)
    prompt = [4, 4, 4]
    free_text = _letters(model.expected_greedy(prompt, 12))
    stop = free_text[5:8]
    pieces: list[str] = []
    handle = engine.submit(
        prompt, SamplingParams(max_new_tokens=12, stop=(stop, "never")), on_token=lambda _, t: pieces.append(t)
    )
    output = handle.result()
    cut = free_text.index(stop)
    assert output.text == free_text[:cut] == "".join(pieces)
    assert output.finish_reason is FinishReason.STOP
    assert len(output.output_token_ids) == cut + len(stop), "tokens up to the end of the stop string are kept"
    (plain,) = engine.generate([prompt], SamplingParams(max_new_tokens=12))
    assert plain.text == free_text


def test_stop_strings_need_a_detokenizer() -> None:
    engine, _ = _engine()
    with pytest.raises(ConfigurationError, match="detokenize"):
        engine.submit([1], SamplingParams(stop=("x",)))


def test_requests_finish_at_max_model_len() -> None:
    model = HashDecoder(vocab_size=VOCAB, max_model_len=10)
    engine = ContinuousBatchingEngine(model)
    (output,) = engine.generate([[1] * 7], SamplingParams(max_new_tokens=50))
    assert len(output.output_token_ids) == 3 and output.finish_reason is FinishReason.LENGTH


def test_cancelling_a_waiting_or_running_request_frees_its_blocks_and_keeps_the_others() -> None:
    manager = SimpleBlockManager(32, 4)
    model = HashDecoder(vocab_size=VOCAB, page_size=4, num_blocks=32)
    engine = ContinuousBatchingEngine(model, manager, scheduler_config=SchedulerConfig(max_num_seqs=1))
    running = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=30))
    waiting = engine.submit([4, 5], SamplingParams(max_new_tokens=5))
    engine.step()
    engine.step()
    running.cancel()
    waiting.cancel()
    finished = engine.step()
    assert {o.request_id for o in finished} == {running.request_id, waiting.request_id}
    assert running.result().finish_reason is FinishReason.CANCELLED and len(running.result().output_token_ids) == 2
    assert waiting.result().output_token_ids == ()
    assert manager.num_free_blocks == 32 and not engine.has_unfinished
    running.cancel()  # a no-op once finished
    engine.step()


def test_submissions_from_other_threads_join_the_running_batch() -> None:
    engine, model = _engine()
    with engine:
        first = engine.submit([1, 2], SamplingParams(max_new_tokens=40))
        next(iter(first))  # the engine is running
        results: dict[int, RequestOutput] = {}

        def client(k: int) -> None:
            results[k] = engine.submit([k, k + 1], SamplingParams(max_new_tokens=5)).result(timeout=30)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert first.result(timeout=30).finish_reason is FinishReason.LENGTH
        with pytest.raises(RuntimeError, match="background thread"):
            engine.step()
    for k, output in results.items():
        assert list(output.output_token_ids) == model.expected_greedy([k, k + 1], 5)
    assert not engine.running_in_background


def test_async_stream_yields_tokens_and_cancels_when_left_early() -> None:
    engine, model = _engine()

    async def main() -> tuple[list[int], list[int]]:
        full = [t async for t in engine.stream([3, 1], SamplingParams(max_new_tokens=6))]
        partial: list[int] = []
        async for token in engine.stream([2, 7], SamplingParams(max_new_tokens=50)):
            partial.append(token)
            if len(partial) == 2:
                break
        return full, partial

    try:
        full, partial = asyncio.run(main())
    finally:
        engine.stop()
    assert full == model.expected_greedy([3, 1], 6)
    assert partial == model.expected_greedy([2, 7], 2)
    deadline = time.monotonic() + 10
    while engine.has_unfinished and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.has_unfinished, "leaving the async for cancelled the request"


def test_a_failing_callback_ends_only_its_request() -> None:
    engine, model = _engine()

    def explode(token: int | None, text: str) -> None:
        raise ValueError("callback failed")

    bad = engine.submit([1, 1], SamplingParams(max_new_tokens=5), on_token=explode)
    good = engine.submit([2, 2], SamplingParams(max_new_tokens=5))
    assert list(good.result().output_token_ids) == model.expected_greedy([2, 2], 5)
    assert bad.result().finish_reason is FinishReason.ERROR
    assert isinstance(bad.result().error, ValueError)


def test_a_model_error_reaches_every_waiting_request_in_background_mode() -> None:
    class Broken(HashDecoder):
        def step(self, batch: StepInput) -> torch.Tensor:
            raise RuntimeError("device lost")

    engine = ContinuousBatchingEngine(Broken(vocab_size=VOCAB))
    with engine:
        output = engine.submit([1], SamplingParams()).result(timeout=30)
    assert output.finish_reason is FinishReason.ERROR and "device lost" in str(output.error)


def test_wrong_logits_from_the_model_are_reported_and_the_step_can_run_again() -> None:
    class Wrong(HashDecoder):
        broken = True

        def step(self, batch: StepInput) -> torch.Tensor:
            return torch.zeros(batch.num_logits, VOCAB + 1) if self.broken else super().step(batch)

    model = Wrong(vocab_size=VOCAB)
    engine = ContinuousBatchingEngine(model)
    handle = engine.submit([1], SamplingParams(max_new_tokens=3))
    with pytest.raises(ConfigurationError, match=rf"shape \[1, {VOCAB}\]"):
        engine.step()
    model.broken = False
    assert list(handle.result().output_token_ids) == model.expected_greedy([1], 3)


def test_bad_prompts_and_oversized_requests_are_rejected_before_anything_runs() -> None:
    model = HashDecoder(vocab_size=VOCAB, max_model_len=16, page_size=2, num_blocks=4)
    engine = ContinuousBatchingEngine(model, SimpleBlockManager(4, 2))
    with pytest.raises(ConfigurationError, match="at least one token"):
        engine.submit([])
    with pytest.raises(ConfigurationError, match=r"\[0, 61\).*position 1"):
        engine.submit([1, VOCAB])
    with pytest.raises(ConfigurationError, match="max_model_len 16"):
        engine.submit([1] * 16)
    with pytest.raises(CapacityError, match="holds 8"):
        engine.submit([1] * 5, SamplingParams(max_new_tokens=4))
    assert not engine.has_unfinished


def test_engine_construction_checks_the_model_and_the_block_manager() -> None:
    with pytest.raises(ConfigurationError, match="DecoderModel"):
        ContinuousBatchingEngine(object())  # type: ignore[arg-type]
    paged = HashDecoder(page_size=4, num_blocks=8)
    with pytest.raises(ConfigurationError, match="pass the block_manager"):
        ContinuousBatchingEngine(paged)
    with pytest.raises(ConfigurationError, match="page_size to equal the model's 4"):
        ContinuousBatchingEngine(paged, PrefixCachingBlockManager(8, 2))
    with pytest.raises(ConfigurationError, match="TokenBudget has none"):
        ContinuousBatchingEngine(HashDecoder(page_size=1, num_blocks=8), TokenBudget(8))


def test_finished_requests_leave_nothing_behind_in_the_loop() -> None:
    engine, _ = _engine()
    engine.generate([[k % VOCAB, 1] for k in range(300)], SamplingParams(max_new_tokens=2))
    scheduler = engine.scheduler
    steps = engine.num_steps
    assert not engine._live and not scheduler.waiting and not scheduler._writer
    engine.generate([[1, 2]], SamplingParams(max_new_tokens=2))
    assert len(scheduler.running) <= 1, "finished sequences are dropped from the running list"
    assert engine.num_steps == steps + 2


def test_a_failing_finish_callback_warns_and_the_loop_goes_on() -> None:
    engine, model = _engine()

    def explode(output: RequestOutput) -> None:
        raise ValueError("finish callback failed")

    with engine:
        bad = engine.submit([1, 1], SamplingParams(max_new_tokens=2), on_finish=explode)
        with pytest.warns(RuntimeWarning, match="finish callback failed"):
            bad.result(timeout=30)
        good = engine.submit([2, 2], SamplingParams(max_new_tokens=3))
        assert list(good.result(timeout=30).output_token_ids) == model.expected_greedy([2, 2], 3)


def test_an_async_stream_raises_when_its_request_fails() -> None:
    class Broken(HashDecoder):
        def step(self, batch: StepInput) -> torch.Tensor:
            raise RuntimeError("device lost")

    engine = ContinuousBatchingEngine(Broken(vocab_size=VOCAB))

    async def main() -> None:
        async for _ in engine.stream([1, 2]):
            pass

    try:
        with pytest.raises(RuntimeError, match="device lost"):
            asyncio.run(main())
    finally:
        engine.stop()


def test_concurrent_submits_and_cancels_lose_nothing_and_free_everything() -> None:
    manager = SimpleBlockManager(64, 4)
    model = HashDecoder(vocab_size=VOCAB, page_size=4, num_blocks=64)
    engine = ContinuousBatchingEngine(model, manager, scheduler_config=SchedulerConfig(max_num_seqs=6))
    outputs: dict[tuple[int, int], RequestOutput] = {}
    lock = threading.Lock()

    def client(k: int) -> None:
        for j in range(6):
            prompt = [k, j, (k * j) % VOCAB]
            handle = engine.submit(prompt, SamplingParams(max_new_tokens=3 + j))
            if j % 3 == 2:
                handle.cancel()
            output = handle.result(timeout=60)
            with lock:
                outputs[k, j] = output

    with engine:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(outputs) == 36
    for (k, j), output in outputs.items():
        expected = model.expected_greedy([k, j, (k * j) % VOCAB], 3 + j)
        if output.finish_reason is FinishReason.CANCELLED:
            assert list(output.output_token_ids) == expected[: len(output.output_token_ids)]
        else:  # finished before its cancellation arrived, or never cancelled
            assert list(output.output_token_ids) == expected
    assert manager.num_free_blocks == 64 and not engine.has_unfinished
