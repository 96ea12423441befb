"""A small OpenAI-compatible HTTP server on the loopback address, for tests, examples and benchmarks.

:class:`EchoServer` answers ``POST /v1/completions`` and ``POST /v1/chat/completions`` the way llama-server,
vLLM and SGLang do (the JSON shapes, and server-sent events when the request says ``"stream": true``), with a
text made from the prompt. It can wait before answering, fail chosen calls with an HTTP status, and counts
what it saw (requests per prompt, calls in flight and their maximum), so a test can check a client against a
real socket instead of a mock. It uses only the standard library (``http.server``), one thread per connection.

    with EchoServer(delay=0.05) as server:
        client = OpenAICompatibleClient(server.url)
        client.complete("hello")  # 'echo: hello'
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = ["EchoServer"]

Responder = Callable[[str, Mapping[str, Any]], str]
FailurePolicy = Callable[[str, int], "int | None"]


def echo(prompt: str, body: Mapping[str, Any]) -> str:
    """The default answer: ``"echo: "`` followed by the prompt."""
    return f"echo: {prompt}"


class EchoServer:
    """An OpenAI-compatible server on ``127.0.0.1`` (a free port), serving from a background thread.

    Args:
        respond: ``respond(prompt, body) -> text``; the prompt of a chat request is its last message's content.
        delay: seconds to wait before answering, or ``delay(prompt) -> seconds``.
        fail: ``fail(prompt, attempt) -> status or None``, where ``attempt`` counts earlier requests with the
            same prompt (0 for the first); a status makes the server answer it at once (no delay) with a JSON
            error body.
        stream_chunk_chars: characters of text per server-sent event when a request streams.
        stream_delay: seconds between two events of a stream.

    Counters (read them after the calls): ``requests`` (every JSON body received, in arrival order),
    ``calls_per_prompt``, ``in_flight``, ``max_in_flight``.
    """

    def __init__(
        self,
        *,
        respond: Responder = echo,
        delay: float | Callable[[str], float] = 0.0,
        fail: FailurePolicy | None = None,
        stream_chunk_chars: int = 4,
        stream_delay: float = 0.0,
    ) -> None:
        self.respond = respond
        self.delay = delay
        self.fail = fail
        self.stream_chunk_chars = stream_chunk_chars
        self.stream_delay = stream_delay
        self.requests: list[dict[str, Any]] = []
        self.calls_per_prompt: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> EchoServer:
        """Serve in a daemon thread; return ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._httpd.serve_forever, args=(0.02,), name="EchoServer", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def reset_counters(self) -> None:
        """Forget the requests seen so far (the failure policy's attempts start again at 0)."""
        with self._lock:
            self.requests.clear()
            self.calls_per_prompt.clear()
            self.max_in_flight = self.in_flight

    def __enter__(self) -> EchoServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- used by the handler threads -------------------------------------------------------------------------------

    def _enter(self, prompt: str, body: dict[str, Any]) -> int:
        with self._lock:
            self.requests.append(body)
            attempt = self.calls_per_prompt[prompt]
            self.calls_per_prompt[prompt] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return attempt

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog (5) drops connections when a client opens dozens at once.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], owner: EchoServer) -> None:
        super().__init__(address, handler)
        self.owner = owner

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up on its call is normal here
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so that a pooled client reuses its connections
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in separate writes; without TCP_NODELAY, Nagle's algorithm holds the body back
        # until the client's delayed ACK (tens of milliseconds) and every answer arrives late.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a test server that prints every request drowns the test output

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/health", "/v1/models"):
            self._send_json(200, {"status": "ok", "data": [{"id": "echo", "object": "model"}]})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as exc:
            self._send_json(400, {"error": {"message": f"invalid JSON: {exc}", "type": "invalid_request_error"}})
            return
        chat = self.path.rstrip("/") == "/v1/chat/completions"
        if not chat and self.path.rstrip("/") != "/v1/completions":
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        prompt = _prompt_of(body, chat)
        if prompt is None:
            self._send_json(400, {"error": {"message": "missing prompt or messages", "type": "invalid_request_error"}})
            return
        owner = self.server.owner
        attempt = owner._enter(prompt, body)
        try:
            # An injected failure answers at once, as an overloaded server's 429/503 does: only answers wait.
            status = owner.fail(prompt, attempt) if owner.fail is not None else None
            if status is not None:
                message = f"injected failure {status} for attempt {attempt} of this prompt"
                headers = {"Retry-After": "0"} if status in (429, 503) else {}
                self._send_json(status, {"error": {"message": message, "type": "server_error"}}, headers)
                return
            delay = owner.delay(prompt) if callable(owner.delay) else owner.delay
            if delay > 0:
                time.sleep(delay)
            text = owner.respond(prompt, body)
            if body.get("stream"):
                self._send_stream(text, chat, body)
            else:
                self._send_json(200, _completion(text, chat, body))
        finally:
            owner._leave()

    def _send_json(self, status: int, payload: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, text: str, chat: bool, body: Mapping[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        owner = self.server.owner
        size = max(1, owner.stream_chunk_chars)
        pieces = [text[i : i + size] for i in range(0, len(text), size)] or [""]
        for number, piece in enumerate(pieces):
            if number and owner.stream_delay > 0:
                time.sleep(owner.stream_delay)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop" if number == len(pieces) - 1 else None}
            if chat:
                choice["delta"] = {"role": "assistant", "content": piece} if number == 0 else {"content": piece}
            else:
                choice["text"] = piece
            event = {"object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}
            self._write_chunk(f"data: {json.dumps(event)}\n\n".encode())
        self._write_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


def _prompt_of(body: Mapping[str, Any], chat: bool) -> str | None:
    if not chat:
        prompt = body.get("prompt")
        return prompt if isinstance(prompt, str) else None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        return None
    content = messages[-1].get("content")
    return content if isinstance(content, str) else None


def _completion(text: str, chat: bool, body: Mapping[str, Any]) -> dict[str, Any]:
    model = body.get("model") or "echo"
    if chat:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        return {"object": "chat.completion", "model": model, "choices": [choice]}
    return {
        "object": "text_completion",
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
    }
