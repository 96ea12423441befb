"""The OpenAI-compatible client and batch_infer against a real HTTP server on the loopback address."""

from __future__ import annotations

import asyncio
import importlib
import socket
import sys
import threading
from typing import Any

import pytest

from llamatelemetry_batch import (
    BatchConfig,
    BatchInferenceError,
    BatchInferenceOptimizer,
    CallTimeoutError,
    InferenceConnectionError,
    InferenceHTTPError,
    InferenceResponseError,
    InferenceTimeoutError,
    OpenAICompatibleClient,
    batch_inference_optimized,
)
from llamatelemetry_batch.http import _completion_text
from llamatelemetry_batch.testing import EchoServer

pytest.importorskip("httpx")


def fast_retries(**kwargs: Any) -> BatchConfig:
    """A config whose retries wait a millisecond or so, not the default half second."""
    return BatchConfig(retry_backoff=0.001, retry_backoff_max=0.01, **kwargs)


def test_complete_and_chat_return_the_servers_text(server: EchoServer) -> None:
    with OpenAICompatibleClient(server.url, model="m") as client:
        assert client.complete("hello") == "echo: hello"
        assert client.chat("hi", system="be brief") == "echo: hi"
        assert client.chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "echo: b"
    completion, chat, chat_list = server.requests
    assert completion == {"prompt": "hello", "model": "m"}
    assert chat["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert len(chat_list["messages"]) == 2


def test_base_url_with_or_without_v1(server: EchoServer) -> None:
    assert OpenAICompatibleClient(server.url + "/v1/").complete("x") == "echo: x"
    assert OpenAICompatibleClient(server.url).base_url == server.url + "/v1"


def test_batch_infer_keeps_prompt_order_when_answers_arrive_out_of_order(server: EchoServer) -> None:
    # Earlier prompts answer later, so completion order is the reverse of prompt order.
    server.delay = lambda prompt: 0.002 * (20 - int(prompt.split()[1]))
    prompts = [f"prompt {i}" for i in range(20)]
    with OpenAICompatibleClient(server.url) as client:
        results = BatchInferenceOptimizer(BatchConfig(max_batch_size=20)).batch_infer(prompts, client.complete)
    assert results == [f"echo: {p}" for p in prompts]


@pytest.mark.parametrize("max_batch_size", [1, 3, 8])
def test_the_server_never_sees_more_than_max_batch_size_calls(server: EchoServer, max_batch_size: int) -> None:
    reached = threading.Event()

    def delay(prompt: str) -> float:
        # Hold each answer until max_batch_size calls are in, so a loaded machine still shows the concurrency.
        if server.in_flight >= max_batch_size:
            reached.set()
        reached.wait(2.0)
        return 0.01

    server.delay = delay
    prompts = [f"p{i}" for i in range(3 * max_batch_size + 1)]
    optimizer = BatchInferenceOptimizer(BatchConfig(max_batch_size=max_batch_size))
    with OpenAICompatibleClient(server.url) as client:
        assert optimizer.batch_infer(prompts, client.complete) == [f"echo: {p}" for p in prompts]
    assert server.max_in_flight == max_batch_size  # reached, never exceeded
    assert optimizer.last_stats is not None and optimizer.last_stats.max_in_flight == max_batch_size


def test_partial_failure_keeps_every_other_result(server: EchoServer) -> None:
    server.fail = lambda prompt, attempt: 400 if prompt.startswith("bad") else None
    prompts = ["a", "bad 1", "b", "bad 2", "c"]
    with OpenAICompatibleClient(server.url) as client, pytest.raises(BatchInferenceError) as caught:
        BatchInferenceOptimizer(fast_retries()).batch_infer(prompts, client.complete)
    error = caught.value
    assert error.results == ["echo: a", None, "echo: b", None, "echo: c"]
    assert error.failed_indices == [1, 3] and error.not_run == []
    failure = error.errors[1]
    assert isinstance(failure, InferenceHTTPError) and failure.status_code == 400 and not failure.transient
    assert "injected failure 400" in failure.body
    assert server.calls_per_prompt["bad 1"] == 1  # a 400 is not transient: never retried
    assert error.stats.failed == 2 and error.stats.succeeded == 3


def test_transient_failures_are_retried_and_nothing_is_lost(server: EchoServer) -> None:
    server.fail = lambda prompt, attempt: 503 if attempt == 0 else None  # every prompt fails once
    prompts = [f"p{i}" for i in range(12)]
    optimizer = BatchInferenceOptimizer(fast_retries(max_batch_size=4))
    with OpenAICompatibleClient(server.url) as client:
        assert optimizer.batch_infer(prompts, client.complete) == [f"echo: {p}" for p in prompts]
    assert all(server.calls_per_prompt[p] == 2 for p in prompts)
    stats = optimizer.last_stats
    assert stats is not None and stats.retries == 12 and stats.calls == 24 and stats.failed == 0


def test_retries_stop_at_max_retries(server: EchoServer) -> None:
    server.fail = lambda prompt, attempt: 500
    config = fast_retries(max_retries=2)
    with OpenAICompatibleClient(server.url) as client, pytest.raises(BatchInferenceError) as caught:
        BatchInferenceOptimizer(config).batch_infer(["x"], client.complete)
    assert server.calls_per_prompt["x"] == 3
    assert caught.value.stats.retries == 2


def test_retry_on_can_exclude_http_errors(server: EchoServer) -> None:
    server.fail = lambda prompt, attempt: 503 if attempt == 0 else None
    config = fast_retries(retry_on=(TimeoutError,))
    with OpenAICompatibleClient(server.url) as client, pytest.raises(BatchInferenceError):
        BatchInferenceOptimizer(config).batch_infer(["x"], client.complete)
    assert server.calls_per_prompt["x"] == 1


def test_client_timeout_is_typed_and_transient(server: EchoServer) -> None:
    server.delay = lambda prompt: 1.5 if prompt == "slow" else 0.0
    config = fast_retries(max_retries=1)
    with OpenAICompatibleClient(server.url, timeout=0.6) as client:
        client.complete("warm-up")
        with pytest.raises(BatchInferenceError) as caught:
            BatchInferenceOptimizer(config).batch_infer(["a", "slow", "b"], client.complete)
    assert caught.value.results == ["echo: a", None, "echo: b"]
    assert isinstance(caught.value.errors[1], InferenceTimeoutError)
    assert server.calls_per_prompt["slow"] == 2  # a timeout is transient: retried once


def test_batch_config_timeout_bounds_each_call(server: EchoServer) -> None:
    server.delay = lambda prompt: 2.0 if prompt == "slow" else 0.0
    config = BatchConfig(timeout=0.5, max_retries=0)
    with OpenAICompatibleClient(server.url) as client:
        client.complete("warm-up")  # the first call builds the pool, which may take a while on a loaded machine
        with pytest.raises(BatchInferenceError) as caught:
            BatchInferenceOptimizer(config).batch_infer(["a", "slow"], client.complete)
    assert caught.value.results[0] == "echo: a"
    assert isinstance(caught.value.errors[1], CallTimeoutError)
    assert caught.value.stats.wall_time_s < 1.5


def test_kwargs_reach_the_request_body(server: EchoServer) -> None:
    with OpenAICompatibleClient(server.url, params={"temperature": 0.0}) as client:
        BatchInferenceOptimizer().batch_infer(["a", "b"], client.complete, max_tokens=7, stop=["\n"])
    assert {r["prompt"] for r in server.requests} == {"a", "b"}
    assert all(r["max_tokens"] == 7 and r["stop"] == ["\n"] and r["temperature"] == 0.0 for r in server.requests)


def test_async_client_through_batch_infer_and_abatch_infer(server: EchoServer) -> None:
    server.delay = 0.01
    prompts = [f"p{i}" for i in range(10)]
    client = OpenAICompatibleClient(server.url, endpoint="chat")
    optimizer = BatchInferenceOptimizer(BatchConfig(max_batch_size=4))
    # From synchronous code (a background loop), twice: the async client survives between runs.
    for _ in range(2):
        assert optimizer.batch_infer(prompts, client.ainfer, max_tokens=3) == [f"echo: {p}" for p in prompts]

    async def main() -> list[str]:
        async with client:
            return await optimizer.abatch_infer(prompts, client.achat)

    assert asyncio.run(main()) == [f"echo: {p}" for p in prompts]
    assert server.max_in_flight <= 4
    assert all(r.get("max_tokens") == 3 for r in server.requests[:20])


def test_async_cancellation_stops_new_calls(server: EchoServer) -> None:
    server.delay = 0.05
    prompts = [f"p{i}" for i in range(40)]
    optimizer = BatchInferenceOptimizer(BatchConfig(max_batch_size=2))

    started: list[str] = []

    async def main() -> None:
        async with OpenAICompatibleClient(server.url) as client:
            await client.acomplete("warm-up")
            server.reset_counters()

            async def counted(prompt: str) -> str:
                started.append(prompt)
                return await client.acomplete(prompt)

            task = asyncio.create_task(optimizer.abatch_infer(prompts, counted))
            while len(server.requests) < 5:  # at least three calls have finished (two run at a time)
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            calls = len(started)
            await asyncio.sleep(0.15)
            assert len(started) == calls  # nothing started after the cancellation
            assert len(server.requests) <= calls  # and the server saw no more than what had started

    asyncio.run(main())
    run = optimizer.last_run
    assert run is not None and 3 <= run.stats.succeeded < 40
    done = [i for i, result in enumerate(run.results) if result is not None]
    assert len(done) == run.stats.succeeded and all(run.results[i] == f"echo: {prompts[i]}" for i in done)
    assert len(run.not_run) == 40 - run.stats.succeeded


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streaming_returns_the_joined_text_and_each_piece(server: EchoServer, endpoint: str) -> None:
    server.stream_chunk_chars = 3
    pieces: list[str] = []
    with OpenAICompatibleClient(server.url) as client:
        call = client.complete if endpoint == "completions" else client.chat
        assert call("streamed prompt", stream=True, on_text=pieces.append) == "echo: streamed prompt"
        stream = client.stream_complete if endpoint == "completions" else client.stream_chat
        assert list(stream("abc")) == ["ech", "o: ", "abc"]
    assert "".join(pieces) == "echo: streamed prompt" and len(pieces) == 7
    assert server.requests[0]["stream"] is True


def test_streaming_async_and_in_a_batch(server: EchoServer) -> None:
    server.stream_chunk_chars = 2
    client = OpenAICompatibleClient(server.url)

    async def main() -> list[str]:
        async with client:
            pieces = [piece async for piece in client.astream_chat("xy")]
            assert pieces == ["ec", "ho", ": ", "xy"]
            return await BatchInferenceOptimizer().abatch_infer(["a", "b", "c"], client.acomplete, stream=True)

    assert asyncio.run(main()) == ["echo: a", "echo: b", "echo: c"]
    assert BatchInferenceOptimizer().batch_infer(["d"], client.chat, stream=True) == ["echo: d"]


def test_http_errors_carry_status_and_body(server: EchoServer) -> None:
    server.fail = lambda prompt, attempt: 429
    with OpenAICompatibleClient(server.url) as client:
        with pytest.raises(InferenceHTTPError) as caught:
            client.complete("x")
        assert caught.value.status_code == 429 and caught.value.transient and caught.value.retry_after == 0.0
        assert "injected failure 429" in str(caught.value)
        server.fail = lambda prompt, attempt: 503
        with pytest.raises(InferenceHTTPError, match="HTTP 503"):
            list(client.stream_complete("y"))
        bad = OpenAICompatibleClient(server.url + "/nowhere")
        with pytest.raises(InferenceHTTPError) as missing:
            bad.complete("x")
        assert missing.value.status_code == 404 and not missing.value.transient


def test_malformed_answers_raise_response_errors(server: EchoServer) -> None:
    server.respond = lambda prompt, body: None  # type: ignore[assignment,return-value]  # JSON null as the text
    with OpenAICompatibleClient(server.url) as client:
        with pytest.raises(InferenceResponseError, match=r"choices\[0\]\.text to be a string"):
            client.complete("x")
        with pytest.raises(InferenceResponseError, match=r"message\.content to be a string"):
            client.chat("x")
    with pytest.raises(InferenceResponseError, match="with choices"):
        _completion_text({"object": "list", "data": []})
    with pytest.raises(InferenceResponseError, match="server reported an error"):
        _completion_text({"error": {"message": "model not loaded"}})


def test_connection_refused_is_a_typed_transient_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = OpenAICompatibleClient(f"http://127.0.0.1:{port}", timeout=2.0)
    with pytest.raises(InferenceConnectionError, match="is the server running"):
        client.complete("x")
    config = fast_retries(max_retries=1)
    with pytest.raises(BatchInferenceError) as caught:
        BatchInferenceOptimizer(config).batch_infer(["x"], client.complete)
    assert caught.value.stats.calls == 2


def test_the_client_is_an_engine_for_batch_inference_optimized(server: EchoServer) -> None:
    with OpenAICompatibleClient(server.url, endpoint="chat") as engine:
        assert batch_inference_optimized(["Hello", "World"], engine, max_batch_size=8) == ["echo: Hello", "echo: World"]
    assert all("messages" in r for r in server.requests)


def test_missing_httpx_names_the_extra(server: EchoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)
    client = OpenAICompatibleClient(server.url)
    with pytest.raises(ImportError, match=r'pip install "llamatelemetry-batch\[http\]"'):
        client.complete("x")
    importlib.import_module("llamatelemetry_batch.http")  # importing the module itself needs no httpx


def test_invalid_client_arguments() -> None:
    with pytest.raises(ValueError, match="base_url"):
        OpenAICompatibleClient("127.0.0.1:8080")
    with pytest.raises(ValueError, match="endpoint"):
        OpenAICompatibleClient("http://127.0.0.1:1", endpoint="embeddings")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_connections"):
        OpenAICompatibleClient("http://127.0.0.1:1", max_connections=0)
