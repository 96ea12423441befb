"""Incremental detokenization: characters split over tokens, leading spaces, stop strings across tokens."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from llamatelemetry_batch.serving import IncrementalDetokenizer


def _utf8_bytes(token_ids: Sequence[int]) -> str:
    """Byte-level tokens: token t is byte t; an incomplete character decodes to U+FFFD."""
    return bytes(token_ids).decode("utf-8", errors="replace")


def _stream(text: str, prompt: str = "> ", stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    prompt_ids = list(prompt.encode())
    detokenizer = IncrementalDetokenizer(_utf8_bytes, len(prompt_ids), stop)
    tokens, pieces = list(prompt_ids), []
    for byte in text.encode():
        tokens.append(byte)
        piece, stopped = detokenizer.add(tokens)
        pieces.append(piece)
        if stopped:
            return pieces, detokenizer
    pieces.append(detokenizer.finish(tokens))
    return pieces, detokenizer


def test_a_character_split_over_tokens_comes_out_whole() -> None:
    pieces, detokenizer = _stream("né€😀!")
    assert "".join(pieces) == detokenizer.text == "né€😀!"
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces, "the first bytes of a multi-byte character are held back"


def test_a_stop_string_across_tokens_is_cut_and_never_streamed() -> None:
    pieces, detokenizer = _stream("hello wörld, bye", stop=("wö", "zz"))
    assert detokenizer.stopped and detokenizer.text == "hello "
    assert "".join(pieces) == "hello "


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from("ab é€\n"), max_size=30),
    stop=st.lists(st.text(alphabet=st.sampled_from("ab é"), min_size=1, max_size=3), max_size=2),
)
def test_streamed_text_is_the_text_before_the_first_stop(text: str, stop: list[str]) -> None:
    pieces, detokenizer = _stream(text, stop=tuple(stop))
    # Generation stops as soon as a stop string has appeared; the text is cut where it begins (here every
    # token completes at most one character, so grow the text a character at a time).
    expected, stopped = text, False
    for end in range(1, len(text) + 1):
        hits = [text[:end].find(s) for s in stop if s in text[:end]]
        if hits:
            expected, stopped = text[: min(hits)], True
            break
    assert detokenizer.text == expected == "".join(pieces)
    assert detokenizer.stopped == stopped


def test_the_first_output_token_keeps_its_leading_space() -> None:
    words = {1: "▁Hello", 2: "▁world", 3: "!"}

    def sentencepiece_like(token_ids: Sequence[int]) -> str:
        """Joins pieces and drops the space of the very first one, as SentencePiece decoding does."""
        return "".join(words[t] for t in token_ids).replace("▁", " ").removeprefix(" ")

    detokenizer = IncrementalDetokenizer(sentencepiece_like, num_prompt_tokens=1)
    assert detokenizer.add([1, 2]) == (" world", False)
    assert detokenizer.add([1, 2, 3]) == ("!", False)
    assert detokenizer.finish([1, 2, 3]) == "" and detokenizer.text == " world!"
