"""Server-sent events, as OpenAI-compatible servers stream completions: ``data: {json}`` lines, a blank line
after each event, and ``data: [DONE]`` at the end. Only the ``data`` field matters here; comments (lines
starting with ``:``) and other fields (``event``, ``id``, ``retry``) are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["DONE", "SSEDecoder", "iter_sse_data"]

DONE = "[DONE]"


class SSEDecoder:
    """Turns lines (without their line endings) into the data of each complete event.

    Feed every line, blank ones included; :meth:`feed` returns an event's data when a blank line ends it.
    Several ``data`` lines of one event are joined with newlines, as the SSE specification says.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The data of an event not yet ended by a blank line (a stream cut after its last ``data`` line)."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def iter_sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The data of each event in ``lines``, up to (not including) ``[DONE]``."""
    decoder = SSEDecoder()
    for line in lines:
        data = decoder.feed(line)
        if data == DONE:
            return
        if data is not None:
            yield data
    data = decoder.flush()
    if data is not None and data != DONE:
        yield data
