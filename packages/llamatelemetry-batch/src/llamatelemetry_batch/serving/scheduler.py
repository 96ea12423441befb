"""The iteration-level scheduler: every step, which sequences run and which of their tokens are computed.

Policy (vLLM v1's unified step, in plain Python):

1. **Running sequences first, oldest first.** Each computes what it has not computed yet, limited by the step's
   token budget (``max_num_batched_tokens``) and ``max_prefill_chunk``: one token in decode, a chunk of the
   prompt in prefill (chunked prefill: a long prompt takes several steps, and only its last chunk asks for
   logits). A decode token needs room in the block manager; when there is none, the **newest** running
   sequence is preempted by recomputation (its blocks are freed, its model state released, and it goes back to
   the front of the waiting queue with its generated tokens, which are recomputed as part of its prompt).
2. **Then waiting sequences, in arrival order**, while the budget, ``max_num_seqs`` and the free blocks allow
   (and never in a step that had to preempt). Admission allocates blocks for the whole prompt; the tokens the
   block manager reports as cached (prefix reuse) are not computed. With ``admission_batch = n`` a step admits
   only when ``n`` sequences fit at once (or every waiting one does, or nothing runs): one step with several new
   prompts instead of several steps with one, for models whose step with a prompt costs much more than a decode
   step (a decode replayed from a CUDA graph, a prompt run eagerly). vLLM's ``scheduler_delay_factor`` trades
   the same latency for the same throughput.

Prefix reuse with chunked prefill needs one more fact than the block manager gives: whether a cached block's
K/V has actually been written. A block manager may register a block for reuse as soon as it is allocated,
while the sequence that writes it is still in prefill or is preempted before writing it. The scheduler
therefore remembers which blocks are complete (every token written) and which sequence is writing the others;
a sequence whose cached prefix holds a block still being written waits for it, and one whose block has no
writer any more computes it itself. This costs O(1) per block handed out, never per step.

The scheduler is pure bookkeeping on the host (no tensors); it never touches finished sequences again, so a
step costs O(running sequences + new blocks), whatever has finished before. It keeps each sequence's block table
and reads it from the block manager again only when the sequence grows into a new block: a table is taken to
change only by growing at the end (the protocol has no way to tell a model that blocks moved). A decode token is
appended without asking ``can_append`` first, since a failed ``append`` changes nothing; the answer is asked
only to decide whom to preempt.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llamatelemetry_batch.serving.sequence import FinishReason, Sequence, SequenceStatus
from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.serving import KVBlockManager, SequenceStep, StepInput
from llamatelemetry_core.validation import check_positive_int

__all__ = ["ScheduledStep", "Scheduler", "SchedulerConfig"]


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step.

    Args:
        max_num_seqs: running sequences at most (the batch size of a decode step).
        max_num_batched_tokens: new tokens computed per step over all sequences (the token budget); keep it
            at least ``max_num_seqs`` so that every running sequence can decode in every step.
        max_prefill_chunk: prompt tokens of one sequence per step at most; ``None``: the whole budget.
        watermark: fraction of the blocks left free when admitting a sequence while others run, so that
            running sequences can keep decoding instead of being preempted at once.
        enable_prefix_reuse: skip the prompt tokens the block manager reports as cached (paged models only).
        admission_batch: admit waiting sequences only when this many can start together (or all waiting ones,
            or nothing runs); 1 admits at every step. At most ``max_num_seqs``.

    Raises:
        ConfigurationError: a value out of range, naming the field.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int | None = None
    watermark: float = 0.01
    enable_prefix_reuse: bool = True
    admission_batch: int = 1

    def __post_init__(self) -> None:
        check_positive_int(self.max_num_seqs, "max_num_seqs")
        check_positive_int(self.admission_batch, "admission_batch")
        if self.admission_batch > self.max_num_seqs:
            raise ConfigurationError(
                f"expected admission_batch <= max_num_seqs ({self.max_num_seqs}), got {self.admission_batch}; "
                "more sequences than can run at once could never be admitted together"
            )
        check_positive_int(self.max_num_batched_tokens, "max_num_batched_tokens")
        if self.max_prefill_chunk is not None:
            check_positive_int(self.max_prefill_chunk, "max_prefill_chunk")
        if isinstance(self.watermark, bool) or not isinstance(self.watermark, int | float):
            raise ConfigurationError(f"expected watermark to be a number in [0, 1), got {self.watermark!r}")
        if not 0.0 <= self.watermark < 1.0:
            raise ConfigurationError(f"expected watermark to be a number in [0, 1), got {self.watermark!r}")
        reuse: object = self.enable_prefix_reuse
        if not isinstance(reuse, bool):
            raise ConfigurationError(f"expected enable_prefix_reuse to be True or False, got {reuse!r}")


@dataclass
class ScheduledStep:
    """One planned step: the model's input and the sequences behind it.

    ``sequences[i]`` computes ``num_new_tokens[i]`` tokens (``step_input.sequences[i]``); ``logits_sequences``
    are those whose logits the model returns, in the order of its rows. ``preempted`` lists the sequences this
    step sent back to the waiting queue.
    """

    step_input: StepInput
    sequences: list[Sequence]
    num_new_tokens: list[int]
    logits_sequences: list[Sequence]
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Whether nothing was scheduled."""
        return not self.sequences


class Scheduler:
    """Waiting and running queues over one :class:`~llamatelemetry_core.serving.KVBlockManager`.

    Args:
        block_manager: where the sequences' KV blocks (or token budget) come from; the scheduler owns it.
        config: the step limits.
        paged: whether the model reads block tables (``SequenceStep.block_table`` is filled and cached
            prefixes are reused); ``False`` for a model that keeps its own KV state.
        release: called with a sequence id when its blocks are freed (finished, cancelled or preempted), so that
            the model forgets that sequence's state.

    Only the engine loop's thread may call it.
    """

    def __init__(
        self,
        block_manager: KVBlockManager,
        config: SchedulerConfig | None = None,
        *,
        paged: bool = True,
        release: Callable[[int], None] | None = None,
    ) -> None:
        self.block_manager = block_manager
        self.config = config if config is not None else SchedulerConfig()
        self.paged = paged
        self._release = release
        self._page_size = block_manager.page_size
        self._reuse = paged and self.config.enable_prefix_reuse
        self._watermark_blocks = int(self.config.watermark * block_manager.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._running_changed = False
        self._complete: set[int] = set()  # blocks whose every token's K/V has been written
        self._writer: dict[int, int] = {}  # block -> the running sequence writing it

    # --- queues ------------------------------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        """Whether any sequence waits or runs."""
        return bool(self.waiting) or any(not s.finished for s in self.running)

    @property
    def num_waiting(self) -> int:
        """Sequences in the waiting queue."""
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Sequences holding blocks."""
        return sum(1 for s in self.running if s.status is SequenceStatus.RUNNING)

    def max_tokens_per_sequence(self) -> int:
        """The most tokens one sequence can ever hold (the whole pool)."""
        return self.block_manager.num_blocks * self._page_size

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; it is admitted by a later :meth:`schedule`."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a sequence now: free its blocks, release its model state, take it out of the queues."""
        if seq.status is SequenceStatus.RUNNING:
            self._drop_blocks(seq)
            self._running_changed = True
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # --- one step ----------------------------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        """Plan the next step (see the module docstring for the policy)."""
        if self._running_changed:
            self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
            self._running_changed = False
        running = self.running
        budget = self.config.max_num_batched_tokens
        plan = ScheduledStep(StepInput(()), [], [], [])
        steps: list[SequenceStep] = []
        # Local names: this loop runs once per running sequence per step, and is the scheduler's hot path.
        add_step, add_seq, add_count, add_logits = (
            steps.append,
            plan.sequences.append,
            plan.num_new_tokens.append,
            plan.logits_sequences.append,
        )
        append, page_size, paged = self.block_manager.append, self._page_size, self.paged
        # Decoding sequences with room in their last block need no new block, so their append cannot fail: they
        # are appended together after the loop, in one append_decode call (one host loop, not one call each).
        # A manager written before the protocol had append_decode is appended one sequence at a time.
        batched = paged and hasattr(self.block_manager, "append_decode")
        later_ids: list[int] = []
        later_tokens: list[int] = []
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            i += 1
            if seq.blocked_on and not self._unblocked(seq):
                continue
            computed = seq.num_computed_tokens
            token_ids = seq.token_ids
            if computed + 1 == len(token_ids):
                # Decode, the common case, inlined: one token, which needs a slot (unless a preemption earlier in
                # the step already gave it one). Append first and ask later: a failed append changes nothing
                # (the protocol's rule), and it rarely fails.
                token = token_ids[computed]
                if seq.num_allocated_tokens == computed and batched and computed < len(seq.table_tuple) * page_size:
                    later_ids.append(seq.seq_id)
                    later_tokens.append(token)
                    seq.num_allocated_tokens = computed + 1
                elif seq.num_allocated_tokens == computed:
                    try:
                        append(seq.seq_id, [token])
                    except CapacityError:
                        if not self._grow(seq, computed + 1, plan.preempted):
                            break  # ``seq`` was the newest and preempted itself
                    else:
                        seq.num_allocated_tokens = computed + 1
                        if paged and len(seq.table_tuple) * page_size <= computed:
                            self._refresh_table(seq)
                add_step(SequenceStep(seq.seq_id, (token,), computed, seq.table_tuple, True))
                add_seq(seq)
                add_count(1)
                add_logits(seq)
                budget -= 1
                continue
            n = self._chunk(seq, budget)
            if computed + n > seq.num_allocated_tokens and not self._grow(seq, computed + n, plan.preempted):
                break
            add_step(self._step_of(seq, n, plan))
            budget -= n
        if later_ids:
            if plan.preempted:  # a preempted sequence holds no blocks any more: nothing to append for it
                gone = {victim.seq_id for victim in plan.preempted}
                kept = [j for j, seq_id in enumerate(later_ids) if seq_id not in gone]
                later_ids = [later_ids[j] for j in kept]
                later_tokens = [later_tokens[j] for j in kept]
            if later_ids:
                self.block_manager.append_decode(later_ids, later_tokens)
        if not plan.preempted and self.waiting and self._admission_open(len(running)):
            while self.waiting and budget > 0 and len(running) < self.config.max_num_seqs:
                seq = self.waiting[0]
                if not self._can_admit(seq):
                    break
                self.waiting.popleft()
                self._admit(seq)
                running.append(seq)
                if seq.blocked_on and not self._unblocked(seq):
                    continue
                n = self._chunk(seq, budget)
                steps.append(self._step_of(seq, n, plan))
                budget -= n
        plan.step_input = StepInput(tuple(steps))
        return plan

    def complete_step(self, plan: ScheduledStep) -> None:
        """Record that the model ran ``plan``: the scheduled tokens are computed now."""
        page_size = self._page_size
        for seq, n in zip(plan.sequences, plan.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            end = start + n
            seq.num_computed_tokens = end
            if self._reuse and start // page_size != end // page_size:
                table, complete, writer, seq_id = seq.block_table, self._complete, self._writer, seq.seq_id
                for j in range(start // page_size, end // page_size):
                    block = table[j]
                    complete.add(block)
                    if writer.get(block) == seq_id:
                        del writer[block]

    # --- helpers -----------------------------------------------------------------------------------------------

    def _admission_open(self, num_running: int) -> bool:
        """Whether this step may admit: ``admission_batch`` free slots (fewer when fewer wait), or none running."""
        wanted = min(self.config.admission_batch, len(self.waiting))
        return num_running == 0 or self.config.max_num_seqs - num_running >= wanted

    def _chunk(self, seq: Sequence, budget: int) -> int:
        n = seq.num_tokens - seq.num_computed_tokens
        limit = self.config.max_prefill_chunk
        if limit is not None and n > limit:
            n = limit
        return n if n < budget else budget

    def _step_of(self, seq: Sequence, n: int, plan: ScheduledStep) -> SequenceStep:
        start = seq.num_computed_tokens
        end = start + n
        token_ids = (seq.token_ids[start],) if n == 1 else tuple(seq.token_ids[start:end])
        want_logits = end == len(seq.token_ids)
        plan.sequences.append(seq)
        plan.num_new_tokens.append(n)
        if want_logits:
            plan.logits_sequences.append(seq)
        return SequenceStep(seq.seq_id, token_ids, start, seq.table_tuple, want_logits)

    def _grow(self, seq: Sequence, end: int, preempted: list[Sequence]) -> bool:
        """Give ``seq`` room for tokens up to ``end``, preempting the newest running sequences if needed;
        False if ``seq`` itself had to go."""
        manager, page_size = self.block_manager, self._page_size
        new_tokens = seq.token_ids[seq.num_allocated_tokens : end]
        while not manager.can_append(seq.seq_id, len(new_tokens)):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        manager.append(seq.seq_id, new_tokens)
        seq.num_allocated_tokens = end
        if self.paged and len(seq.block_table) * page_size < end:
            self._refresh_table(seq)
        return True

    def _refresh_table(self, seq: Sequence) -> None:
        """``seq`` got new blocks at the end of its table (tables only ever grow at the end)."""
        table = self.block_manager.block_table(seq.seq_id)
        self._claim_fresh(seq, table[len(seq.block_table) :])
        seq.block_table = table
        seq.table_tuple = tuple(table)

    def _can_admit(self, seq: Sequence) -> bool:
        manager = self.block_manager
        if not manager.can_allocate(seq.token_ids):
            return False
        if not self.running or self._watermark_blocks == 0:
            return True
        # Counted as if nothing were cached: the watermark is a margin, not an exact figure.
        needed = -(-seq.num_tokens // self._page_size)
        return manager.num_free_blocks - needed >= self._watermark_blocks

    def _admit(self, seq: Sequence) -> None:
        manager, page_size = self.block_manager, self._page_size
        cached = manager.allocate(seq.seq_id, seq.token_ids)
        if not (0 <= cached < seq.num_tokens and cached % page_size == 0):
            manager.free(seq.seq_id)
            raise ConfigurationError(
                f"the block manager reported {cached} cached tokens for a sequence of {seq.num_tokens}; expected a "
                f"multiple of page_size {page_size} below the sequence length (KVBlockManager.allocate's contract)"
            )
        seq.status = SequenceStatus.RUNNING
        seq.num_allocated_tokens = seq.num_tokens
        if not self._reuse:
            cached = 0
        if self.paged:
            table = manager.block_table(seq.seq_id)
            seq.block_table = table
            seq.table_tuple = tuple(table)
            if self._reuse:
                first_fresh = cached // page_size
                self._claim_fresh(seq, table[first_fresh:])
                complete = self._complete
                seq.blocked_on.extend((j, b) for j, b in enumerate(table[:first_fresh]) if b not in complete)
        seq.num_computed_tokens = cached
        if seq.metrics.first_scheduled_time is None:
            seq.metrics.first_scheduled_time = time.perf_counter()
            seq.metrics.num_cached_prompt_tokens = cached

    def _claim_fresh(self, seq: Sequence, blocks: list[int]) -> None:
        """``seq`` writes these newly handed-out blocks: they are not complete until it has."""
        if self._reuse:
            for block in blocks:
                self._complete.discard(block)
                self._writer[block] = seq.seq_id

    def _unblocked(self, seq: Sequence) -> bool:
        """Whether ``seq`` may compute now: every cached block it reads is complete, or has no writer left
        (then ``seq`` rewinds and writes it itself)."""
        blocked, complete, writer = seq.blocked_on, self._complete, self._writer
        while blocked:
            index, block = blocked[0]
            if block in complete:
                blocked.popleft()
                continue
            owner = writer.get(block)
            if owner is not None and owner != seq.seq_id:
                return False
            seq.num_computed_tokens = min(seq.num_computed_tokens, index * self._page_size)
            for _, other in blocked:
                if other not in complete:
                    writer.setdefault(other, seq.seq_id)
            blocked.clear()
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._drop_blocks(seq)
        seq.status = SequenceStatus.WAITING
        seq.metrics.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _drop_blocks(self, seq: Sequence) -> None:
        self.block_manager.free(seq.seq_id)
        if self._reuse:
            seq_id, writer = seq.seq_id, self._writer
            for block in seq.block_table[seq.num_computed_tokens // self._page_size :]:
                if writer.get(block) == seq_id:
                    del writer[block]
        seq.num_computed_tokens = 0
        seq.num_allocated_tokens = 0
        seq.block_table = []
        seq.table_tuple = ()
        seq.blocked_on.clear()
        if self._release is not None:
            self._release(seq.seq_id)
