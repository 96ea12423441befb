"""``BlockManager``: which blocks of a paged KV cache each sequence holds. Pure Python, no tensors.

It implements core's :class:`~llamatelemetry_core.serving.KVBlockManager` protocol, which a scheduler drives. The
pool has ``num_blocks`` blocks of ``page_size`` tokens. Each block has a reference count (the sequences whose
block table lists it); a block nobody references is either *free* (a FIFO list) or *cached*: it holds the K/V of
a full block of tokens that a later sequence with the same prefix can reuse, and it is evicted, least recently
used first, only when the free list is empty. (vLLM's ``block_pool.py`` and nano-vllm's ``block_manager.py`` keep
the same bookkeeping apart from tensors.)

Prefix caching. A full block is keyed by its tokens and the key of the block before it (a hash chain), so a key
names a whole prefix. A new sequence walks its full blocks through the map and reuses every leading hit;
:meth:`BlockManager.allocate` returns how many tokens it may skip (a multiple of ``page_size``, always fewer than
the prompt: the last token is computed, so that the model yields the logits of the next one). A block is
registered only once its K/V have certainly been computed: when the sequence grows by :meth:`append` (tokens are
appended after the model has run every token before them), when :meth:`mark_computed` says so, or at
:meth:`free` up to what was computed. A block being filled by a chunked prefill is therefore never handed to
another sequence.

Copy-on-write. :meth:`fork` gives a child sequence the parent's blocks: full blocks are shared (reference counts),
the last partial block is copied at once into a new block, and the copies the tensor side must perform are
returned as ``(source, destination)`` pairs. A block that a sequence still writes into is therefore never shared,
and a full block is never written again.

Every method that cannot be carried out raises :class:`~llamatelemetry_core.errors.CapacityError` (out of
blocks), ``KeyError`` (unknown sequence) or :class:`~llamatelemetry_core.errors.ConfigurationError` (an argument
of the wrong type or out of range: sequence ids are ints, token ids ints >= 0) before changing anything.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.serving import check_decode_step
from llamatelemetry_core.validation import check_non_negative_int, check_positive_int

__all__ = ["BlockManager", "BlockManagerStats"]

_ROOT = 0  # the "key" before a sequence's first block
_INT = frozenset({int})


@dataclass(frozen=True)
class BlockManagerStats:
    """A snapshot of the pool.

    ``used``: blocks referenced by a sequence; ``cached``: unreferenced blocks kept for prefix reuse
    (evictable); ``free``: the rest. ``prefix_hit_rate``: prompt tokens served from the cache over prompt tokens
    allocated. ``waste_slots``: token slots allocated to sequences but empty (at most one block per sequence, less
    one token).
    """

    num_blocks: int
    page_size: int
    used: int
    cached: int
    free: int
    num_sequences: int
    num_tokens: int
    prefix_hit_tokens: int
    prompt_tokens: int
    waste_slots: int

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def waste_fraction(self) -> float:
        """Empty slots over the slots held by sequences."""
        held = self.num_tokens + self.waste_slots
        return self.waste_slots / held if held else 0.0


@dataclass(slots=True)
class _Sequence:
    blocks: list[int]
    tokens: list[int]
    computed: int = 0  # leading tokens whose K/V are known to be written
    keys: list[int] = field(default_factory=list)  # chain key of each leading full block already walked
    # Up to how many tokens the sequence may grow by the decode fast path: while its last block has room and no
    # block has filled since the last registration (so only the tokens change). Kept by ``_refresh``.
    limit: int = 0


class BlockManager:
    """Blocks per sequence over a pool of ``num_blocks`` blocks of ``page_size`` tokens; see the module docstring.

    ``enable_prefix_caching=False`` frees blocks as soon as their last reference goes.
    """

    def __init__(self, num_blocks: int, page_size: int, *, enable_prefix_caching: bool = True) -> None:
        self._num_blocks = check_positive_int(num_blocks, "num_blocks")
        self._page_size = check_positive_int(page_size, "page_size")
        if not isinstance(enable_prefix_caching, bool):
            raise ConfigurationError(
                f"expected enable_prefix_caching to be True or False, got {enable_prefix_caching!r}"
            )
        self.enable_prefix_caching = enable_prefix_caching
        try:
            self._refs = [0] * num_blocks
            self._free: deque[int] = deque(range(num_blocks))
        except MemoryError:
            raise CapacityError(
                f"the bookkeeping of num_blocks={num_blocks} blocks does not fit in memory; give fewer blocks"
            ) from None
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks with content, LRU first
        self._key_of: dict[int, int] = {}  # block -> chain key, for registered blocks
        self._block_of: dict[int, int] = {}  # chain key -> block
        self._seqs: dict[int, _Sequence] = {}
        self._hit_tokens = 0
        self._prompt_tokens = 0

    # --- the protocol ---------------------------------------------------------------------------------------------

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
        """Blocks that can be handed out now: free, or cached and unreferenced (evictable)."""
        return len(self._free) + len(self._cached)

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        """Whether a new sequence of ``token_ids`` fits now (prefix-cache hits counted)."""
        tokens = _token_list(token_ids)
        if not tokens:
            return False
        hits = self._prefix_hits(tokens)
        return self._blocks_for(len(tokens)) - len(hits) <= self._available_after(hits)

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Give a new sequence blocks for ``token_ids``; return how many leading tokens are already cached."""
        _check_seq_id(seq_id, "seq_id")
        if seq_id in self._seqs:
            raise ConfigurationError(f"sequence {seq_id} already holds blocks; free it first or use another id")
        tokens = _token_list(token_ids, fresh=True)  # the sequence's own list: the caller's stays the caller's
        if not tokens:
            raise ConfigurationError(f"sequence {seq_id}: expected at least one token to allocate, got none")
        hits = self._prefix_hits(tokens)
        need = self._blocks_for(len(tokens)) - len(hits)
        available = self._available_after(hits)
        if need > available:
            raise CapacityError(
                f"sequence {seq_id} needs {need} new blocks of {self._page_size} tokens for {len(tokens)} tokens "
                f"({len(hits)} blocks from the prefix cache) but {available} can be handed out of "
                f"{self._num_blocks}; preempt or finish a sequence, or give the cache more blocks"
            )
        for block in hits:
            self._take(block)
        blocks = hits + [self._pop_block() for _ in range(need)]
        cached = len(hits) * self._page_size
        seq = _Sequence(blocks, tokens, computed=cached, keys=self._chain(tokens, len(hits)))
        self._refresh(seq)
        self._seqs[seq_id] = seq
        self._hit_tokens += cached
        self._prompt_tokens += len(tokens)
        return cached

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        """Whether ``num_tokens`` more tokens of a running sequence fit now."""
        if type(num_tokens) is not int or num_tokens < 0:
            check_non_negative_int(num_tokens, "num_tokens")
        seq = self._seqs.get(seq_id)
        if seq is not None and len(seq.tokens) + num_tokens <= len(seq.blocks) * self._page_size:
            return True  # the decode hot path: room left in the last block
        seq = seq or self._seq(seq_id)
        need = -(-(len(seq.tokens) + num_tokens) // self._page_size) - len(seq.blocks)
        return need <= 0 or need <= len(self._free) + len(self._cached)

    def append(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Extend a running sequence by ``token_ids`` (decode), taking new blocks as needed.

        Every token the sequence held before is taken as computed (its full blocks become reusable prefixes).
        """
        seq = self._seqs.get(seq_id)
        if seq is not None and type(token_ids) is list and len(token_ids) == 1:
            # The decode hot path (once per running sequence per step): one token, an int >= 0 (checked inline: a
            # call would cost more than the append), room in the last block and no block completed since the last
            # registration, so only the tokens change. Anything else takes the general path below.
            tokens = seq.tokens
            held = len(tokens)
            token = token_ids[0]
            if held < seq.limit and type(token) is int and token >= 0:
                seq.computed = held
                tokens.append(token)  # in place: the list object stays the sequence's
                return
        seq = seq or self._seq(seq_id)
        tokens = _token_list(token_ids)
        held = len(seq.tokens)
        need = -(-(held + len(tokens)) // self._page_size) - len(seq.blocks)
        if need > 0:
            available = len(self._free) + len(self._cached)
            if need > available:
                raise CapacityError(
                    f"sequence {seq_id} needs {need} more blocks to grow from {held} to {held + len(tokens)} tokens "
                    f"but {available} can be handed out; preempt a sequence (can_append answers first)"
                )
        if held // self._page_size > len(seq.keys):
            self._mark(seq, held)
        else:
            seq.computed = held
        if need > 0:
            self._take_blocks(seq, need)
        seq.tokens.extend(tokens)
        self._refresh(seq)

    def append_many(self, appends: Sequence[tuple[int, Sequence[int]]]) -> None:
        """:meth:`append` for every ``(seq_id, token_ids)`` of a decode step, all or nothing, in one host loop.

        Raises ``CapacityError`` (changing nothing) when the step needs more blocks than can be handed out.
        """
        seqs, page = self._seqs, self._page_size
        plan: list[tuple[_Sequence, Sequence[int], int]] = []
        total = 0
        for seq_id, token_ids in appends:
            seq = seqs.get(seq_id) or self._seq(seq_id)
            # Checked before anything changes: one int >= 0 inline (the decode step), anything else in full.
            if type(token_ids) is not list or len(token_ids) != 1 or type(token_ids[0]) is not int or token_ids[0] < 0:
                token_ids = _token_list(token_ids)
            need = -(-(len(seq.tokens) + len(token_ids)) // page) - len(seq.blocks)
            if need > 0:
                total += need
            plan.append((seq, token_ids, need))
        available = len(self._free) + len(self._cached)
        if total > available:
            raise CapacityError(
                f"this step's {len(plan)} sequences need {total} more blocks but {available} can be handed out; "
                "preempt a sequence first"
            )
        for seq, token_ids, need in plan:
            held = len(seq.tokens)
            if need <= 0 and held + len(token_ids) <= seq.limit:
                seq.computed = held  # the decode fast path, as in append
                seq.tokens += token_ids
                continue
            if held // page > len(seq.keys):
                self._mark(seq, held)
            else:
                seq.computed = held
            if need > 0:
                self._take_blocks(seq, need)
            seq.tokens.extend(token_ids)
            self._refresh(seq)

    def append_decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """Append one token to each sequence (a decode step), all or nothing, in one host loop.

        ``token_ids[i]`` is the new token of ``seq_ids[i]``. This is the scheduler's per-step path: one call for
        every sequence that decodes, instead of one :meth:`append` each. Raises ``ConfigurationError`` for
        mismatched lengths or a repeated id, ``KeyError`` for an unknown sequence and ``CapacityError`` when the
        step needs more blocks than can be handed out; nothing changes then.
        """
        chosen = self._decode_step(seq_ids, token_ids)
        page = self._page_size
        available = len(self._free) + len(self._cached)
        if available < len(chosen):  # one token each needs at most one block each: count only when it may not fit
            need = sum(1 for seq in chosen if len(seq.tokens) >= len(seq.blocks) * page)
            if need > available:
                raise CapacityError(
                    f"this decode step's {len(chosen)} sequences need {need} more blocks but {available} can be "
                    "handed out; preempt a sequence first"
                )
        for seq, token in zip(chosen, token_ids, strict=True):
            tokens = seq.tokens
            held = len(tokens)
            if held < seq.limit:
                seq.computed = held
                tokens.append(token)
                continue
            if held // page > len(seq.keys):
                self._mark(seq, held)
            else:
                seq.computed = held
            if held >= len(seq.blocks) * page:
                self._take_blocks(seq, 1)
            tokens.append(token)
            self._refresh(seq)

    def replace_last_tokens(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        """Set the last token of each sequence (``token_ids[i]`` for ``seq_ids[i]``), all or nothing.

        For an engine that appends a stand-in while the token's value is still on the device and hands over the
        value once it has read it back (``llamatelemetry_core.serving.TokenFeed``). A token can be replaced until
        its block is registered for prefix reuse, which happens only once the sequence has grown past that block:
        a later replacement raises ``ConfigurationError`` (the block's hash would no longer match its tokens), as
        do mismatched lengths or a repeated id; ``KeyError`` for an unknown sequence.
        """
        chosen = self._decode_step(seq_ids, token_ids)
        page = self._page_size
        for seq_id, seq in zip(seq_ids, chosen, strict=True):
            last = len(seq.tokens) - 1
            if last < 0 or last < len(seq.keys) * page:
                raise ConfigurationError(
                    f"sequence {seq_id}: its last token (position {last}) is in a block already registered for "
                    "prefix reuse; replace a stand-in token before appending past its block"
                )
        for seq, token in zip(chosen, token_ids, strict=True):
            seq.tokens[-1] = token

    def _decode_step(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> list[_Sequence]:
        """The sequences of a one-token-each call, once its arguments are checked."""
        check_decode_step(seq_ids, token_ids)
        seqs = self._seqs
        try:
            return [seqs[i] for i in seq_ids]
        except KeyError as exc:
            raise KeyError(
                f"unknown sequence {exc.args[0]!r}: allocate it first (known: {len(seqs)} sequences)"
            ) from None

    def free(self, seq_id: int) -> None:
        """Release a sequence's blocks; its computed full blocks stay cached for prefix reuse until evicted."""
        seq = self._seq(seq_id)
        self._mark(seq, seq.computed)
        del self._seqs[seq_id]
        # In reverse, so that a prefix's tail is evicted before its head (which more prompts share).
        for block in reversed(seq.blocks):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._key_of:
                self._cached[block] = None
            else:
                self._free.append(block)

    def block_table(self, seq_id: int) -> list[int]:
        """The sequence's blocks, in token order."""
        return list(self._seq(seq_id).blocks)

    def block_table_view(self, seq_id: int) -> Sequence[int]:
        """The sequence's block list itself, not a copy: read it, never change it.

        It only grows while the sequence lives (a freed and re-allocated id gets a new list), which lets a
        block-table builder copy just the blocks added since the last step.
        """
        return self._seq(seq_id).blocks

    def num_tokens(self, seq_id: int) -> int:
        """Tokens the sequence holds."""
        return len(self._seq(seq_id).tokens)

    # --- beyond the protocol --------------------------------------------------------------------------------------

    def fork(self, parent_id: int, child_id: int) -> list[tuple[int, int]]:
        """Start ``child_id`` as a copy of ``parent_id`` (parallel sampling, beam search).

        Full blocks are shared; the last partial block is copied into a new block now. Returns the
        ``(source, destination)`` block copies the tensor side must perform before the child is written.
        """
        parent = self._seq(parent_id)
        _check_seq_id(child_id, "child_id")
        if child_id in self._seqs:
            raise ConfigurationError(f"sequence {child_id} already holds blocks; fork into a new id")
        partial = len(parent.tokens) % self._page_size != 0
        if partial and self.num_free_blocks < 1:
            raise CapacityError(
                f"forking sequence {parent_id} copies its last partial block, but no block can be handed out of "
                f"{self._num_blocks}"
            )
        shared = parent.blocks[:-1] if partial else list(parent.blocks)
        for block in shared:
            self._refs[block] += 1
        copies: list[tuple[int, int]] = []
        blocks = list(shared)
        if partial:
            dst = self._pop_block()
            copies.append((parent.blocks[-1], dst))
            blocks.append(dst)
        child = _Sequence(blocks, list(parent.tokens), parent.computed, list(parent.keys))
        self._refresh(child)
        self._seqs[child_id] = child
        return copies

    def mark_computed(self, seq_id: int, num_tokens: int) -> None:
        """Say that the first ``num_tokens`` tokens of a sequence have their K/V written (after a prefill step)."""
        seq = self._seq(seq_id)
        check_non_negative_int(num_tokens, "num_tokens")
        if not num_tokens <= len(seq.tokens):
            raise ConfigurationError(
                f"sequence {seq_id} holds {len(seq.tokens)} tokens; expected num_tokens in [0, {len(seq.tokens)}], "
                f"got {num_tokens}"
            )
        self._mark(seq, num_tokens)

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    @property
    def seq_ids(self) -> list[int]:
        """Sequences holding blocks, in allocation order."""
        return list(self._seqs)

    def token_ids(self, seq_id: int) -> list[int]:
        """The tokens a sequence holds."""
        return list(self._seq(seq_id).tokens)

    def ref_count(self, block: int) -> int:
        """How many sequences reference ``block``."""
        given: object = block  # checked as the object it is: a caller may pass anything
        if isinstance(given, bool) or not isinstance(given, int) or not 0 <= given < self._num_blocks:
            raise ConfigurationError(f"expected block in [0, num_blocks={self._num_blocks}), got {block!r}")
        return self._refs[block]

    def stats(self) -> BlockManagerStats:
        """A snapshot of the pool and of prefix-cache use."""
        tokens = sum(len(s.tokens) for s in self._seqs.values())
        slots = sum(len(s.blocks) for s in self._seqs.values()) * self._page_size
        used = sum(1 for r in self._refs if r)
        return BlockManagerStats(
            num_blocks=self._num_blocks,
            page_size=self._page_size,
            used=used,
            cached=len(self._cached),
            free=len(self._free),
            num_sequences=len(self._seqs),
            num_tokens=tokens,
            prefix_hit_tokens=self._hit_tokens,
            prompt_tokens=self._prompt_tokens,
            waste_slots=slots - tokens,
        )

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (their blocks become free); blocks in use keep their content."""
        self._free.extend(self._cached)
        self._cached.clear()
        self._block_of.clear()
        self._key_of.clear()

    # --- internals ------------------------------------------------------------------------------------------------

    def _seq(self, seq_id: int) -> _Sequence:
        seq = self._seqs.get(seq_id)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id!r}: allocate it first (known: {len(self._seqs)} sequences)")
        return seq

    def _refresh(self, seq: _Sequence) -> None:
        """Recompute ``seq.limit`` after its blocks or registered keys changed."""
        seq.limit = min(len(seq.blocks), len(seq.keys) + 1) * self._page_size

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self._page_size)

    def _chain(self, tokens: Sequence[int], num_blocks: int, keys: Iterable[int] = ()) -> list[int]:
        """Chain keys of the first ``num_blocks`` full blocks of ``tokens`` (continuing ``keys``)."""
        out = list(keys)
        page = self._page_size
        for i in range(len(out), num_blocks):
            parent = out[-1] if out else _ROOT
            out.append(hash((parent, tuple(tokens[i * page : (i + 1) * page]))))
        return out

    def _prefix_hits(self, tokens: Sequence[int]) -> list[int]:
        """Cached blocks holding the longest prefix of full blocks within all but the last token."""
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        parent = _ROOT
        page = self._page_size
        for i in range((len(tokens) - 1) // page):
            key = hash((parent, tuple(tokens[i * page : (i + 1) * page])))
            block = self._block_of.get(key)
            if block is None:
                break
            hits.append(block)
            parent = key
        return hits

    def _available_after(self, hits: Sequence[int]) -> int:
        """Blocks that can be handed out once ``hits`` are referenced (an unreferenced hit stops being evictable)."""
        return self.num_free_blocks - sum(1 for b in hits if self._refs[b] == 0)

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._cached[block]
        self._refs[block] += 1

    def _take_blocks(self, seq: _Sequence, need: int) -> None:
        """Give ``seq`` ``need`` more blocks (the caller checked that they can be handed out)."""
        free, blocks = self._free, seq.blocks
        if len(free) >= need:  # the common case: from the free list, no eviction
            for _ in range(need):
                block = free.popleft()
                self._refs[block] = 1
                blocks.append(block)
        else:
            blocks.extend([self._pop_block() for _ in range(need)])

    def _pop_block(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:  # evict the least recently used cached block
            block, _ = self._cached.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        self._refs[block] = 1
        return block

    def _mark(self, seq: _Sequence, computed: int) -> None:
        """Record ``computed`` tokens and register the full blocks they cover for prefix reuse.

        Runs once per block a decoding sequence fills, so it extends the key chain in place (never re-walks it).
        """
        if computed > seq.computed:
            seq.computed = computed
        page, keys = self._page_size, seq.keys
        start, full = len(keys), seq.computed // page
        if start >= full:
            return
        tokens, blocks = seq.tokens, seq.blocks
        parent = keys[-1] if keys else _ROOT
        register = self.enable_prefix_caching
        block_of, key_of = self._block_of, self._key_of
        for i in range(start, full):
            parent = hash((parent, tuple(tokens[i * page : (i + 1) * page])))
            keys.append(parent)
            block = blocks[i]
            # A block already registered (a prefix hit) keeps its key; a second copy of a known prefix stays
            # unregistered and is freed normally.
            if register and parent not in block_of and block not in key_of:
                block_of[parent] = block
                key_of[block] = parent
        seq.limit = min(len(blocks), full + 1) * page


def _token_list(token_ids: object, *, fresh: bool = False) -> list[int]:
    """``token_ids`` as a list, checked: ints >= 0 (no bools, floats or strings, which ``int()`` would turn into
    other tokens without a word). A list comes back as it is unless ``fresh`` (the caller keeps the result)."""
    if type(token_ids) is not list and (isinstance(token_ids, str | bytes) or not isinstance(token_ids, Iterable)):
        raise ConfigurationError(f"expected token_ids to be a sequence of ints, got {type(token_ids).__name__}")
    tokens = token_ids if type(token_ids) is list and not fresh else list(token_ids)
    if not _plain_tokens(tokens):
        bad = next(t for t in tokens if type(t) is not int or t < 0)
        raise ConfigurationError(f"expected token_ids to hold ints >= 0, got {bad!r} ({type(bad).__name__})")
    return tokens


def _plain_tokens(tokens: list[object]) -> bool:
    """Whether every token is an int >= 0, with exact type tests (no bools, floats, strings), in C."""
    return not tokens or (set(map(type, tokens)) <= _INT and min(tokens) >= 0)  # type: ignore[type-var, operator]


def _check_seq_id(seq_id: object, name: str) -> None:
    if isinstance(seq_id, bool) or not isinstance(seq_id, int):
        raise ConfigurationError(f"expected {name} to be an int, got {seq_id!r} ({type(seq_id).__name__})")
