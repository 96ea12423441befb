"""A submitted request as its caller sees it: stream its tokens, wait for its output, cancel it.

The engine's thread hands tokens and the final output to the handle; any thread may read, iterate, wait or cancel.
"""

from __future__ import annotations

import functools
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from llamatelemetry_batch.serving.sequence import RequestOutput, Sequence

if TYPE_CHECKING:
    from llamatelemetry_batch.serving.engine import ContinuousBatchingEngine

__all__ = ["RequestHandle", "TokenCallback"]

_WAIT_SLICE = 0.5  # seconds a waiting caller sleeps before checking that the background loop still runs

TokenCallback = Callable[[int | None, str], None]
"""Called on the engine's thread with each new token id and the text it adds ('' without a detokenizer, often ''
while a character or a possible stop string is incomplete); once more with ``None`` and the remaining text when a
request with a detokenizer finishes with text not handed out yet."""


class RequestHandle:
    """A submitted request: stream its tokens, wait for its output, or cancel it. Safe from any thread."""

    def __init__(
        self,
        engine: ContinuousBatchingEngine,
        seq: Sequence,
        on_token: TokenCallback | None,
        on_finish: Callable[[RequestOutput], None] | None,
    ) -> None:
        self.request_id = seq.seq_id
        self.prompt_token_ids = tuple(seq.token_ids)
        self._engine = engine
        self._seq = seq  # owned by the engine's thread once queued
        self._on_token = on_token
        self._on_finish = on_finish
        self._cond = threading.Condition(threading.Lock())
        self._waiters = 0  # threads blocked in _wait_for; the engine notifies only when there are some
        self._tokens: list[int] = []
        self._output: RequestOutput | None = None

    def done(self) -> bool:
        """Whether the request has finished (for any reason)."""
        return self._output is not None

    def cancel(self) -> None:
        """Stop the request at the next step (its blocks are freed then); a no-op once it has finished."""
        self._engine._post(self.request_id)

    @property
    def token_ids(self) -> list[int]:
        """The tokens generated so far (a copy)."""
        with self._cond:
            return list(self._tokens)

    def result(self, timeout: float | None = None) -> RequestOutput:
        """Wait for the request to finish and return its output.

        Without a background thread, the calling thread runs engine steps until then.

        Raises:
            TimeoutError: ``timeout`` seconds passed first (the request keeps running).
        """
        self._wait_for(lambda: self._output is not None, timeout)
        assert self._output is not None
        return self._output

    def __iter__(self) -> Iterator[int]:
        """The generated token ids, as they come; ends when the request finishes."""
        index = 0
        while True:
            self._wait_for(functools.partial(self._has_news, index), None)
            with self._cond:
                fresh, finished = self._tokens[index:], self._output is not None
            if not fresh and finished:
                return
            index += len(fresh)
            yield from fresh

    def _has_news(self, seen: int) -> bool:
        return len(self._tokens) > seen or self._output is not None

    def _wait_for(self, ready: Callable[[], bool], timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                # Counted before the check: a token delivered after the check then finds a waiter to notify.
                self._waiters += 1
                try:
                    if ready():
                        return
                    if self._engine.running_in_background:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
                        # In slices, so that a loop that stopped meanwhile is noticed (then this thread steps).
                        self._cond.wait(_WAIT_SLICE if left is None else min(left, _WAIT_SLICE))
                        continue
                finally:
                    self._waiters -= 1
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
            self._engine.step()

    # Called on the engine's thread.
    def _deliver(self, token: int) -> None:
        self._tokens.append(token)
        if self._waiters:
            with self._cond:
                self._cond.notify_all()

    def _complete(self, output: RequestOutput) -> None:
        # on_finish runs first, so that a caller woken by result() sees its effects.
        if self._on_finish is not None:
            try:
                self._on_finish(output)
            except Exception as exc:  # the request is done; one caller's bug must not stop the loop for all
                warnings.warn(
                    f"on_finish of request {self.request_id} raised {exc!r}; the engine goes on",
                    RuntimeWarning,
                    stacklevel=1,
                )
        with self._cond:
            self._output = output
            self._cond.notify_all()
