"""A ready inference function for OpenAI-compatible servers: llama-server, vLLM, SGLang and the like.

    client = OpenAICompatibleClient("http://127.0.0.1:8080", model="gemma-3-1b")
    optimizer.batch_infer(prompts, client.complete, max_tokens=64, temperature=0.0)
    optimizer.batch_infer(prompts, client.achat, system="Answer briefly.")  # async, on an event loop

``complete`` posts to ``/v1/completions`` and returns the generated text; ``chat`` posts one user message (or
your messages) to ``/v1/chat/completions`` and returns the reply's content. Keyword arguments become fields of
the request body (``max_tokens``, ``temperature``, ``stop``, ...), on top of ``params`` given to the client.
``stream=True`` reads the answer as server-sent events (``on_text`` sees each piece as it arrives) and returns
the joined text; ``stream_complete``/``stream_chat`` yield the pieces.

One pooled httpx client serves every synchronous call from any thread, and one async client per event loop
serves the ``a``-methods, so that concurrent calls reuse keep-alive connections. The client does not retry:
``batch_infer`` does, with backoff. Errors are typed: :class:`~llamatelemetry_batch.errors.InferenceHTTPError`
(status and the start of the body; 408/429/5xx count as transient), ``InferenceTimeoutError``,
``InferenceConnectionError`` and ``InferenceResponseError``.

httpx is an optional dependency: ``pip install "llamatelemetry-batch[http]"``; it is imported on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from llamatelemetry_batch.errors import (
    InferenceConnectionError,
    InferenceHTTPError,
    InferenceResponseError,
    InferenceTimeoutError,
)
from llamatelemetry_batch.sse import DONE, SSEDecoder

if TYPE_CHECKING:
    import httpx

__all__ = ["Messages", "OpenAICompatibleClient"]

Messages = Sequence[Mapping[str, Any]]
BODY_EXCERPT = 500


def _require_httpx() -> None:
    try:
        import httpx  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "OpenAICompatibleClient needs httpx, which is not installed; install it with: "
            'pip install "llamatelemetry-batch[http]"',
            name="httpx",
        ) from exc


class OpenAICompatibleClient:
    """Completions and chat completions over HTTP, as one-prompt inference functions (sync and async).

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8080`` (llama-server) or ``http://host:8000/v1`` (vLLM);
            ``/v1`` is appended when missing.
        model: the ``model`` field of each request (vLLM and SGLang need it; llama-server ignores it).
        endpoint: what :meth:`infer` calls: ``"completions"`` or ``"chat"``.
        api_key: sent as ``Authorization: Bearer <key>``.
        timeout: seconds for connecting and for each read (``None``: wait forever); past it a call raises
            :class:`~llamatelemetry_batch.errors.InferenceTimeoutError`.
        max_connections: size of the connection pool (keep it >= ``BatchConfig.max_batch_size``).
        headers: extra HTTP headers.
        params: default fields of every request body (``{"max_tokens": 128, "temperature": 0}``).

    Raises:
        ImportError: httpx is not installed (on first call).
        ValueError: ``base_url``, ``endpoint`` or ``max_connections`` is invalid.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        endpoint: Literal["completions", "chat"] = "completions",
        api_key: str | None = None,
        timeout: float | None = 60.0,
        max_connections: int = 100,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        if endpoint not in ("completions", "chat"):
            raise ValueError(f"expected endpoint to be 'completions' or 'chat', got {endpoint!r}")
        connections: object = max_connections
        if isinstance(connections, bool) or not isinstance(connections, int) or connections < 1:
            raise ValueError(f"expected max_connections to be a positive integer, got {max_connections!r}")
        url: object = base_url
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"expected base_url to start with http:// or https://, got {base_url!r}")
        root = base_url.rstrip("/")
        self.base_url = root if root.endswith("/v1") else f"{root}/v1"
        self.model = model
        self.endpoint = endpoint
        self.timeout = timeout
        self.max_connections = max_connections
        self.headers = dict(headers or {})
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.params = dict(params or {})
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    # --- one-prompt inference functions ------------------------------------------------------------------------------

    def infer(self, prompt: str, **params: Any) -> str:
        """:meth:`complete` or :meth:`chat`, as ``endpoint`` says (so the client itself is an engine)."""
        return self.chat(prompt, **params) if self.endpoint == "chat" else self.complete(prompt, **params)

    async def ainfer(self, prompt: str, **params: Any) -> str:
        """:meth:`acomplete` or :meth:`achat`, as ``endpoint`` says."""
        return await (self.achat(prompt, **params) if self.endpoint == "chat" else self.acomplete(prompt, **params))

    def complete(
        self, prompt: str, *, stream: bool = False, on_text: Callable[[str], None] | None = None, **params: Any
    ) -> str:
        """The text the server generates after ``prompt`` (``POST /v1/completions``)."""
        body = self._body({"prompt": prompt}, params)
        if stream:
            return _join(self._stream("completions", body), on_text)
        return _completion_text(self._post("completions", body))

    def chat(
        self,
        prompt: str | Messages,
        *,
        system: str | None = None,
        stream: bool = False,
        on_text: Callable[[str], None] | None = None,
        **params: Any,
    ) -> str:
        """The assistant's reply (``POST /v1/chat/completions``) to ``prompt`` as a user message, or to messages."""
        body = self._body({"messages": _messages(prompt, system)}, params)
        if stream:
            return _join(self._stream("chat/completions", body), on_text)
        return _chat_text(self._post("chat/completions", body))

    async def acomplete(
        self, prompt: str, *, stream: bool = False, on_text: Callable[[str], None] | None = None, **params: Any
    ) -> str:
        """:meth:`complete`, awaited."""
        body = self._body({"prompt": prompt}, params)
        if stream:
            return await _ajoin(self._astream("completions", body), on_text)
        return _completion_text(await self._apost("completions", body))

    async def achat(
        self,
        prompt: str | Messages,
        *,
        system: str | None = None,
        stream: bool = False,
        on_text: Callable[[str], None] | None = None,
        **params: Any,
    ) -> str:
        """:meth:`chat`, awaited."""
        body = self._body({"messages": _messages(prompt, system)}, params)
        if stream:
            return await _ajoin(self._astream("chat/completions", body), on_text)
        return _chat_text(await self._apost("chat/completions", body))

    def stream_complete(self, prompt: str, **params: Any) -> Iterator[str]:
        """The generated text in pieces, as the server sends them."""
        return self._stream("completions", self._body({"prompt": prompt}, params))

    def stream_chat(self, prompt: str | Messages, *, system: str | None = None, **params: Any) -> Iterator[str]:
        """The reply in pieces, as the server sends them."""
        return self._stream("chat/completions", self._body({"messages": _messages(prompt, system)}, params))

    def astream_complete(self, prompt: str, **params: Any) -> AsyncIterator[str]:
        """:meth:`stream_complete`, asynchronously."""
        return self._astream("completions", self._body({"prompt": prompt}, params))

    def astream_chat(self, prompt: str | Messages, *, system: str | None = None, **params: Any) -> AsyncIterator[str]:
        """:meth:`stream_chat`, asynchronously."""
        return self._astream("chat/completions", self._body({"messages": _messages(prompt, system)}, params))

    # --- lifetime ---------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the pooled synchronous client (async clients close with :meth:`aclose` on their loop)."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close the running loop's async client and the synchronous one."""
        client = self._async_clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
        self.close()

    def __enter__(self) -> OpenAICompatibleClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> OpenAICompatibleClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"OpenAICompatibleClient({self.base_url!r}, model={self.model!r}, endpoint={self.endpoint!r})"

    # --- transport --------------------------------------------------------------------------------------------------

    def _body(self, payload: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
        body = {**self.params, **params, **payload}
        if self.model is not None:
            body.setdefault("model", self.model)
        return body

    def _limits(self) -> httpx.Limits:
        import httpx

        return httpx.Limits(max_connections=self.max_connections, max_keepalive_connections=self.max_connections)

    def _sync_client(self) -> httpx.Client:
        if self._client is None:
            _require_httpx()
            import httpx

            with self._lock:
                if self._client is None:
                    self._client = httpx.Client(timeout=self.timeout, limits=self._limits(), headers=self.headers)
        return self._client

    def _async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            _require_httpx()
            import httpx

            client = httpx.AsyncClient(timeout=self.timeout, limits=self._limits(), headers=self.headers)
            self._async_clients[loop] = client
        return client

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        url = f"{self.base_url}/{path}"
        with self._errors(url):
            response = self._sync_client().post(url, json=body)
        _raise_for_status(response, response.text, url)
        return _json(response.text, url)

    async def _apost(self, path: str, body: dict[str, Any]) -> Any:
        url = f"{self.base_url}/{path}"
        with self._errors(url):
            response = await self._async_client().post(url, json=body)
        _raise_for_status(response, response.text, url)
        return _json(response.text, url)

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[str]:
        url = f"{self.base_url}/{path}"
        body = {**body, "stream": True}
        with self._errors(url), self._sync_client().stream("POST", url, json=body) as response:
            if response.status_code >= 400:
                _raise_for_status(response, response.read().decode(errors="replace"), url)
            decoder = SSEDecoder()
            for line in response.iter_lines():
                data = decoder.feed(line)
                if data == DONE:
                    return
                if data is not None:
                    yield _delta_text(data, url)

    async def _astream(self, path: str, body: dict[str, Any]) -> AsyncIterator[str]:
        url = f"{self.base_url}/{path}"
        body = {**body, "stream": True}
        with self._errors(url):
            async with self._async_client().stream("POST", url, json=body) as response:
                if response.status_code >= 400:
                    _raise_for_status(response, (await response.aread()).decode(errors="replace"), url)
                decoder = SSEDecoder()
                async for line in response.aiter_lines():
                    data = decoder.feed(line)
                    if data == DONE:
                        return
                    if data is not None:
                        yield _delta_text(data, url)

    def _errors(self, url: str) -> _MapErrors:
        return _MapErrors(url, self.timeout)


class _MapErrors:
    """Turns httpx's transport errors into this package's typed errors (a context manager, sync or async)."""

    def __init__(self, url: str, timeout: float | None) -> None:
        self.url = url
        self.timeout = timeout

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        httpx = sys.modules.get("httpx")
        if exc is None or httpx is None:  # nothing raised, or not by httpx (which is not even imported)
            return

        if isinstance(exc, httpx.TimeoutException):
            raise InferenceTimeoutError(
                f"no answer from {self.url} within {self.timeout} s ({type(exc).__name__}); the server may be "
                "overloaded: raise OpenAICompatibleClient(timeout=...) or lower max_batch_size"
            ) from exc
        if isinstance(exc, httpx.TransportError):
            raise InferenceConnectionError(
                f"cannot talk to {self.url}: {type(exc).__name__}: {exc}; is the server running at that address?"
            ) from exc


def _raise_for_status(response: httpx.Response, text: str, url: str) -> None:
    if response.status_code < 400:
        return
    excerpt = text[:BODY_EXCERPT] + ("..." if len(text) > BODY_EXCERPT else "")
    retry_after: float | None = None
    with contextlib.suppress(ValueError):  # a date, or nothing: no number to honour
        retry_after = float(response.headers.get("Retry-After", ""))
    raise InferenceHTTPError(response.status_code, excerpt, url, retry_after)


def _json(text: str, url: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InferenceResponseError(f"expected JSON from {url}, got {_excerpt(text)}") from exc


def _excerpt(text: str) -> str:
    return repr(text[:BODY_EXCERPT] + ("..." if len(text) > BODY_EXCERPT else ""))


def _first_choice(payload: Any, what: str) -> Mapping[str, Any]:
    if isinstance(payload, Mapping) and "error" in payload and "choices" not in payload:
        raise InferenceResponseError(f"the server reported an error: {_excerpt(json.dumps(payload['error']))}")
    choices = payload.get("choices") if isinstance(payload, Mapping) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise InferenceResponseError(
            f"expected an OpenAI-compatible {what} with choices, got {_excerpt(json.dumps(payload))}"
        )
    return choices[0]


def _completion_text(payload: Any) -> str:
    text = _first_choice(payload, "completion").get("text")
    if not isinstance(text, str):
        raise InferenceResponseError(f"expected choices[0].text to be a string, got {_excerpt(json.dumps(payload))}")
    return text


def _chat_text(payload: Any) -> str:
    message = _first_choice(payload, "chat completion").get("message")
    content = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(content, str):
        raise InferenceResponseError(
            f"expected choices[0].message.content to be a string, got {_excerpt(json.dumps(payload))}"
        )
    return content


def _delta_text(data: str, url: str) -> str:
    choice = _first_choice(_json(data, url), "stream event")
    if "text" in choice:
        return str(choice.get("text") or "")
    delta = choice.get("delta")
    return str(delta.get("content") or "") if isinstance(delta, Mapping) else ""


def _messages(prompt: str | Messages, system: str | None) -> list[dict[str, Any]]:
    if isinstance(prompt, str):
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    else:
        messages = [dict(m) for m in prompt]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _join(pieces: Iterator[str], on_text: Callable[[str], None] | None) -> str:
    parts = []
    for piece in pieces:
        if on_text is not None:
            on_text(piece)
        parts.append(piece)
    return "".join(parts)


async def _ajoin(pieces: AsyncIterator[str], on_text: Callable[[str], None] | None) -> str:
    parts = []
    async for piece in pieces:
        if on_text is not None:
            on_text(piece)
        parts.append(piece)
    return "".join(parts)
