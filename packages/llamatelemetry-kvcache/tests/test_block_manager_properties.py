"""Property tests: random allocate/append/fork/free/prefix-reuse never leak, double-assign or corrupt a block.

The model keeps what every slot of every block holds (the token whose K/V were written there) and writes each
sequence's new tokens where its block table says, as a model runner would; after every step each sequence must
read back exactly its own tokens, whatever the others did (prefix hits, copy-on-write forks, evictions).
"""

from __future__ import annotations

from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llamatelemetry_core.errors import CapacityError
from llamatelemetry_kvcache import BlockManager

# A tiny vocabulary, so that prompts share prefixes often.
TOKENS = st.lists(st.integers(0, 2), min_size=1, max_size=24)


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.manager: BlockManager | None = None
        self.slots: dict[int, list[int | None]] = {}
        self.tokens: dict[int, list[int]] = {}
        self.next_id = 0

    @rule(num_blocks=st.integers(1, 24), page_size=st.sampled_from([1, 2, 3, 4, 16]), prefix=st.booleans())
    @precondition(lambda self: self.manager is None)
    def create(self, num_blocks: int, page_size: int, prefix: bool) -> None:
        self.manager = BlockManager(num_blocks, page_size, enable_prefix_caching=prefix)
        self.slots = {b: [None] * page_size for b in range(num_blocks)}

    def _write(self, seq_id: int, start: int) -> None:
        assert self.manager is not None
        page, table = self.manager.page_size, self.manager.block_table(seq_id)
        for pos in range(start, len(self.tokens[seq_id])):
            self.slots[table[pos // page]][pos % page] = self.tokens[seq_id][pos]

    @rule(tokens=TOKENS)
    @precondition(lambda self: self.manager is not None)
    def allocate(self, tokens: list[int]) -> None:
        assert self.manager is not None
        seq_id, self.next_id = self.next_id, self.next_id + 1
        free_before = self.manager.num_free_blocks
        if not self.manager.can_allocate(tokens):
            try:
                self.manager.allocate(seq_id, tokens)
            except CapacityError:
                assert self.manager.num_free_blocks == free_before and seq_id not in self.manager
                return
            raise AssertionError("can_allocate said no but allocate succeeded")
        cached = self.manager.allocate(seq_id, tokens)
        assert cached % self.manager.page_size == 0 and 0 <= cached < len(tokens)
        self.tokens[seq_id] = list(tokens)
        self._check_sequence(seq_id, upto=cached)  # the reused prefix already holds these tokens
        self._write(seq_id, cached)

    @rule(data=st.data(), new=st.lists(st.integers(0, 2), min_size=1, max_size=6))
    @precondition(lambda self: bool(self.tokens))
    def append(self, data: st.DataObject, new: list[int]) -> None:
        assert self.manager is not None
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        if not self.manager.can_append(seq_id, len(new)):
            try:
                self.manager.append(seq_id, new)
            except CapacityError:
                assert self.manager.num_tokens(seq_id) == len(self.tokens[seq_id])
                return
            raise AssertionError("can_append said no but append succeeded")
        start = len(self.tokens[seq_id])
        self.manager.append(seq_id, new)
        self.tokens[seq_id].extend(new)
        self._write(seq_id, start)

    @rule(data=st.data(), token=st.integers(0, 2))
    @precondition(lambda self: bool(self.tokens))
    def append_decode(self, data: st.DataObject, token: int) -> None:
        assert self.manager is not None
        ids = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, unique=True))
        free_before = self.manager.num_free_blocks
        try:
            self.manager.append_decode(ids, [token] * len(ids))
        except CapacityError:
            assert self.manager.num_free_blocks == free_before
            assert all(self.manager.num_tokens(s) == len(self.tokens[s]) for s in self.tokens)
            return
        for seq_id in ids:
            self.tokens[seq_id].append(token)
            self._write(seq_id, len(self.tokens[seq_id]) - 1)

    @rule(data=st.data())
    @precondition(lambda self: bool(self.tokens))
    def fork(self, data: st.DataObject) -> None:
        assert self.manager is not None
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        child, self.next_id = self.next_id, self.next_id + 1
        try:
            copies = self.manager.fork(parent, child)
        except CapacityError:
            assert self.manager.num_free_blocks == 0 and child not in self.manager
            return
        for src, dst in copies:
            self.slots[dst] = list(self.slots[src])
        self.tokens[child] = list(self.tokens[parent])

    @rule(data=st.data())
    @precondition(lambda self: bool(self.tokens))
    def free(self, data: st.DataObject) -> None:
        assert self.manager is not None
        seq_id = data.draw(st.sampled_from(sorted(self.tokens)))
        self.manager.free(seq_id)
        del self.tokens[seq_id]

    @rule()
    @precondition(lambda self: bool(self.tokens))
    def free_everything(self) -> None:
        assert self.manager is not None
        for seq_id in list(self.tokens):
            self.manager.free(seq_id)
        self.tokens.clear()
        assert all(self.manager.ref_count(b) == 0 for b in range(self.manager.num_blocks))
        assert self.manager.num_free_blocks == self.manager.num_blocks

    def _check_sequence(self, seq_id: int, upto: int | None = None) -> None:
        assert self.manager is not None
        page, table = self.manager.page_size, self.manager.block_table(seq_id)
        tokens = self.tokens[seq_id]
        end = len(tokens) if upto is None else upto
        got = [self.slots[table[pos // page]][pos % page] for pos in range(end)]
        assert got == tokens[:end], f"sequence {seq_id} reads {got}, holds {tokens[:end]}"

    @invariant()
    def every_sequence_reads_its_own_tokens(self) -> None:
        for seq_id in self.tokens:
            self._check_sequence(seq_id)

    @invariant()
    def blocks_are_accounted_for(self) -> None:
        manager = self.manager
        if manager is None:
            return
        uses: Counter[int] = Counter()
        for seq_id in self.tokens:
            table = manager.block_table(seq_id)
            assert len(table) == len(set(table)), "a block listed twice in one table"
            assert len(table) == -(-len(self.tokens[seq_id]) // manager.page_size)
            assert manager.num_tokens(seq_id) == len(self.tokens[seq_id])
            uses.update(table)
        for block in range(manager.num_blocks):
            assert manager.ref_count(block) == uses[block]
        stats = manager.stats()
        assert stats.used == len(uses)
        assert stats.used + stats.cached + stats.free == manager.num_blocks
        assert manager.num_free_blocks == stats.cached + stats.free
        assert sorted(manager.seq_ids) == sorted(self.tokens)


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestBlockManagerProperties = BlockManagerMachine.TestCase
