"""Block managers without prefix caching: a plain pool of blocks, and a token budget for unpaged models.

* :class:`SimpleBlockManager` implements :class:`~llamatelemetry_core.serving.KVBlockManager` with a free list
  and one block table per sequence, in plain Python: a paged allocator with no prefix reuse (``allocate``
  always returns 0 cached tokens). Every operation costs O(1) per block it hands out or takes back; a fresh
  pool costs O(1) memory (block ids never used yet come from a counter, not from a pre-built list).
* :class:`TokenBudget` is the admission budget of a model that keeps its own KV state (a Hugging Face cache,
  a tensor per sequence): ``max_tokens`` tokens over all sequences, counted, with no block ids (its "blocks"
  are single tokens, ``page_size`` 1). The scheduler admits and preempts against it exactly as against a paged
  cache; a paged model cannot use it (it has no block tables to give).

Neither reads the values of the tokens it is given, only how many there are: token lists must be sequences (a
string is refused, not counted by its characters), and a decode step's tokens are checked by the protocol's
``check_decode_step``.
"""

from __future__ import annotations

from collections.abc import Sequence

from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.serving import check_decode_step
from llamatelemetry_core.validation import check_non_negative_int, check_positive_int

__all__ = ["SimpleBlockManager", "TokenBudget"]


class SimpleBlockManager:
    """``num_blocks`` blocks of ``page_size`` tokens, handed to sequences on demand; no prefix caching.

    Raises:
        ConfigurationError: a non-positive ``num_blocks`` or ``page_size``.
    """

    def __init__(self, num_blocks: int, page_size: int = 1) -> None:
        self._num_blocks = check_positive_int(num_blocks, "num_blocks")
        self._page_size = check_positive_int(page_size, "page_size")
        self._free: list[int] = []
        self._next_unused = 0
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}

    @property
    def page_size(self) -> int:
        """Tokens per block."""
        return self._page_size

    @property
    def num_blocks(self) -> int:
        """Blocks in the pool."""
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence."""
        return len(self._free) + self._num_blocks - self._next_unused

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self._page_size)

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Whether a new sequence of these tokens fits now (the tokens themselves are checked by ``allocate``)."""
        _check_container(token_ids)
        return self._blocks_for(len(token_ids)) <= self.num_free_blocks

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Give a new sequence blocks for ``token_ids``; returns 0 (nothing is ever cached).

        Raises:
            ConfigurationError: ``seq_id`` already holds blocks, or ``token_ids`` is empty.
            CapacityError: not enough free blocks (nothing changes).
        """
        check_non_negative_int(seq_id, "seq_id")
        if seq_id in self._tables:
            raise ConfigurationError(f"sequence {seq_id} already holds blocks; free it before allocating again")
        _check_container(token_ids)
        if not token_ids:
            raise ConfigurationError("expected at least one token to allocate, got an empty sequence")
        needed = self._blocks_for(len(token_ids))
        self._check_free(needed, f"a new sequence of {len(token_ids)} tokens")
        self._tables[seq_id] = self._take(needed)
        self._lengths[seq_id] = len(token_ids)
        return 0

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        """Whether ``num_tokens`` more tokens of sequence ``seq_id`` fit now (``KeyError`` if unknown)."""
        table = self._tables[seq_id]
        check_non_negative_int(num_tokens, "num_tokens")
        return self._blocks_for(self._lengths[seq_id] + num_tokens) - len(table) <= self.num_free_blocks

    def append(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Extend sequence ``seq_id`` by ``token_ids``, taking blocks as needed.

        Raises:
            KeyError: unknown ``seq_id``.
            CapacityError: not enough free blocks (nothing changes).
        """
        table = self._tables[seq_id]
        _check_container(token_ids)
        length = self._lengths[seq_id] + len(token_ids)
        if length > len(table) * self._page_size:
            needed = self._blocks_for(length) - len(table)
            self._check_free(needed, f"{len(token_ids)} more tokens of sequence {seq_id}")
            table.extend(self._take(needed))
        self._lengths[seq_id] = length

    def append_decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """One more token for each sequence of ``seq_ids`` (a decode step), all or nothing.

        Raises:
            ConfigurationError: lengths differ or an id repeats.
            KeyError: an unknown sequence.
            CapacityError: not enough free blocks (nothing changes).
        """
        check_decode_step(seq_ids, token_ids)
        tables, lengths, page = self._tables, self._lengths, self._page_size
        needed = sum(1 for seq_id in seq_ids if lengths[seq_id] >= len(tables[seq_id]) * page)
        self._check_free(needed, f"one more token for each of {len(seq_ids)} sequences")
        for seq_id in seq_ids:
            length = lengths[seq_id] + 1
            table = tables[seq_id]
            if length > len(table) * page:
                table.extend(self._take(1))
            lengths[seq_id] = length

    def replace_last_tokens(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """Accept the values of stand-in tokens (see ``llamatelemetry_core.serving.TokenFeed``): nothing to change,
        since this manager never reads token values; checked as :meth:`append_decode` checks its arguments."""
        _check_replacement(self._lengths, seq_ids, token_ids)

    def free(self, seq_id: int) -> None:
        """Return sequence ``seq_id``'s blocks to the pool (``KeyError`` if unknown)."""
        table = self._tables.pop(seq_id)
        del self._lengths[seq_id]
        self._free.extend(table)

    def block_table(self, seq_id: int) -> list[int]:
        """Sequence ``seq_id``'s blocks in token order (a copy; ``KeyError`` if unknown)."""
        return list(self._tables[seq_id])

    def num_tokens(self, seq_id: int) -> int:
        """Tokens sequence ``seq_id`` holds (``KeyError`` if unknown)."""
        return self._lengths[seq_id]

    def _check_free(self, needed: int, what: str) -> None:
        free = self.num_free_blocks
        if needed > free:
            raise CapacityError(
                f"{what} needs {needed} blocks of {self._page_size} tokens, {free} of {self._num_blocks} are free; "
                "free finished sequences first or raise num_blocks"
            )

    def _take(self, count: int) -> list[int]:
        if count == 1 and self._free:
            return [self._free.pop()]
        taken = [self._free.pop() for _ in range(min(count, len(self._free)))]
        fresh = count - len(taken)
        taken.extend(range(self._next_unused, self._next_unused + fresh))
        self._next_unused += fresh
        return taken


class TokenBudget:
    """At most ``max_tokens`` tokens over all sequences, for a model that keeps its own KV state.

    Implements :class:`~llamatelemetry_core.serving.KVBlockManager` with ``page_size`` 1 and ``num_blocks``
    ``max_tokens``, but hands out no block ids: :meth:`block_table` is always empty, so only an unpaged model
    (``DecoderModel.page_size is None``) may use it. Each call is O(1).

    Raises:
        ConfigurationError: a non-positive ``max_tokens``.
    """

    def __init__(self, max_tokens: int) -> None:
        self._capacity = check_positive_int(max_tokens, "max_tokens")
        self._used = 0
        self._lengths: dict[int, int] = {}

    @property
    def page_size(self) -> int:
        """1: the budget counts single tokens."""
        return 1

    @property
    def num_blocks(self) -> int:
        """The budget, in tokens."""
        return self._capacity

    @property
    def num_free_blocks(self) -> int:
        """Tokens left in the budget."""
        return self._capacity - self._used

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Whether a new sequence of these tokens fits now (the tokens themselves are checked by ``allocate``)."""
        _check_container(token_ids)
        return self._used + len(token_ids) <= self._capacity

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Count a new sequence's tokens; returns 0 (nothing is cached).

        Raises:
            ConfigurationError: ``seq_id`` is already counted, or ``token_ids`` is empty.
            CapacityError: the budget would be exceeded (nothing changes).
        """
        check_non_negative_int(seq_id, "seq_id")
        if seq_id in self._lengths:
            raise ConfigurationError(f"sequence {seq_id} is already counted; free it before allocating again")
        _check_container(token_ids)
        if not token_ids:
            raise ConfigurationError("expected at least one token to allocate, got an empty sequence")
        self._check(len(token_ids), f"a new sequence of {len(token_ids)} tokens")
        self._lengths[seq_id] = len(token_ids)
        self._used += len(token_ids)
        return 0

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        """Whether ``num_tokens`` more tokens of sequence ``seq_id`` fit now (``KeyError`` if unknown)."""
        if seq_id not in self._lengths:
            raise KeyError(seq_id)
        check_non_negative_int(num_tokens, "num_tokens")
        return self._used + num_tokens <= self._capacity

    def append(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Count ``token_ids`` more tokens of sequence ``seq_id`` (``KeyError`` if unknown, ``CapacityError`` if
        over budget; nothing changes then)."""
        length = self._lengths[seq_id]
        _check_container(token_ids)
        self._check(len(token_ids), f"{len(token_ids)} more tokens of sequence {seq_id}")
        self._lengths[seq_id] = length + len(token_ids)
        self._used += len(token_ids)

    def append_decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """Count one more token for each sequence of ``seq_ids`` (a decode step), all or nothing
        (``ConfigurationError`` for mismatched lengths or a repeated id, ``KeyError`` if one is unknown,
        ``CapacityError`` if over budget)."""
        check_decode_step(seq_ids, token_ids)
        lengths = self._lengths
        for seq_id in seq_ids:
            if seq_id not in lengths:
                raise KeyError(seq_id)
        self._check(len(seq_ids), f"one more token for each of {len(seq_ids)} sequences")
        for seq_id in seq_ids:
            lengths[seq_id] += 1
        self._used += len(seq_ids)

    def replace_last_tokens(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """Accept the values of stand-in tokens (see ``llamatelemetry_core.serving.TokenFeed``): nothing to change,
        since a budget only counts tokens; checked as :meth:`append_decode` checks its arguments."""
        _check_replacement(self._lengths, seq_ids, token_ids)

    def free(self, seq_id: int) -> None:
        """Give sequence ``seq_id``'s tokens back to the budget (``KeyError`` if unknown)."""
        self._used -= self._lengths.pop(seq_id)

    def block_table(self, seq_id: int) -> list[int]:
        """Always empty: a budget hands out no blocks (``KeyError`` if unknown)."""
        if seq_id not in self._lengths:
            raise KeyError(seq_id)
        return []

    def num_tokens(self, seq_id: int) -> int:
        """Tokens sequence ``seq_id`` holds (``KeyError`` if unknown)."""
        return self._lengths[seq_id]

    def _check(self, needed: int, what: str) -> None:
        free = self._capacity - self._used
        if needed > free:
            raise CapacityError(
                f"{what} needs {needed} tokens of the budget, {free} of {self._capacity} are left; finish or cancel "
                "requests first or raise max_tokens"
            )


def _check_replacement(lengths: dict[int, int], seq_ids: Sequence[int], token_ids: Sequence[int]) -> None:
    check_decode_step(seq_ids, token_ids)
    for seq_id in seq_ids:
        if seq_id not in lengths:
            raise KeyError(seq_id)
        if lengths[seq_id] == 0:
            raise ConfigurationError(f"sequence {seq_id} holds no token to replace")


def _check_container(token_ids: object) -> None:
    """A counting manager reads only how many tokens it is given, not their values: it checks that they come as a
    sequence (a string is not one), cheaply, since the scheduler appends through here for every sequence."""
    if type(token_ids) is list:
        return
    if isinstance(token_ids, str | bytes) or not isinstance(token_ids, Sequence):
        raise ConfigurationError(f"expected token_ids to be a sequence of ints, got {type(token_ids).__name__}")
