"""Incremental detokenization and stop strings.

The engine knows token ids only; a request with stop strings needs text. The caller gives the engine a
``detokenize(token_ids) -> str`` function (``tokenizer.decode`` of any tokenizer). Decoding one token at a time
is wrong for most tokenizers (SentencePiece drops a leading space, byte-level BPE splits a UTF-8 character over
several tokens), and decoding the whole output every step costs O(length) per token. So, as Hugging Face's
text-generation-inference does, each step decodes a short window twice, ``tokens[prefix:read]`` and
``tokens[prefix:]``, and emits the difference once it no longer ends in an incomplete character (U+FFFD);
the window starts a few tokens into the prompt so that the first output token is decoded in context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["Detokenize", "IncrementalDetokenizer"]

Detokenize = Callable[[Sequence[int]], str]
"""Turns token ids into text (``tokenizer.decode``)."""

_CONTEXT_TOKENS = 5  # prompt tokens decoded before the output, for the first token's leading space


class IncrementalDetokenizer:
    """The text of one sequence's output, grown token by token, and the stop strings it watches.

    With stop strings, the text handed out lags the decoded text by ``len(longest stop) - 1`` characters, so
    that nothing of a stop string is ever streamed; :meth:`finish` hands out the rest.
    """

    __slots__ = ("_detokenize", "_emitted", "_hold", "_prefix_offset", "_read_offset", "stop", "stopped", "text")

    def __init__(self, detokenize: Detokenize, num_prompt_tokens: int, stop: tuple[str, ...] = ()) -> None:
        self._detokenize = detokenize
        self._prefix_offset = max(num_prompt_tokens - _CONTEXT_TOKENS, 0)
        self._read_offset = num_prompt_tokens
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> tuple[str, bool]:
        """Account for the newest token of ``token_ids`` (prompt and output so far).

        Returns the text that may be streamed now (often empty) and whether a stop string appeared; then
        :attr:`text` is cut before the stop string, and the returned text ends there.
        """
        prefix_text = self._detokenize(token_ids[self._prefix_offset : self._read_offset])
        new_text = self._detokenize(token_ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return "", False
        self._prefix_offset = self._read_offset
        self._read_offset = len(token_ids)
        self.stopped = self._grow(new_text[len(prefix_text) :])
        end = len(self.text) if self.stopped else len(self.text) - self._hold
        return self._take(end), self.stopped

    def finish(self, token_ids: Sequence[int]) -> str:
        """At the end: the text not handed out yet (held back, or of tokens that ended mid-character)."""
        if not self.stopped and self._read_offset < len(token_ids):
            prefix_text = self._detokenize(token_ids[self._prefix_offset : self._read_offset])
            new_text = self._detokenize(token_ids[self._prefix_offset :])
            self._read_offset = len(token_ids)
            self.stopped = self._grow(new_text[len(prefix_text) :])
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        piece = self.text[self._emitted : end]
        self._emitted = end
        return piece

    def _grow(self, delta: str) -> bool:
        before = len(self.text)
        self.text += delta
        if not self.stop:
            return False
        # A stop string may straddle the old text and the new piece: search from where it could begin.
        start = max(before - self._hold, 0)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)
