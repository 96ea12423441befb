"""The continuous-batching engine loop over any :class:`~llamatelemetry_core.serving.DecoderModel`.

Every step: take the requests submitted and cancelled since the last step, let the :class:`Scheduler` plan the
step, run the model once, sample the next token of every sequence whose prompt (or chunk) is complete, stream
it to the request, and finish the requests that are done (their blocks are freed at once, so a waiting request
can join the very next step). A request submitted while the engine runs joins at the next step.

With ``overlap=True`` (a model that accepts a :class:`~llamatelemetry_core.serving.TokenFeed`), the host's work
of one step runs while the device computes the previous one: the tokens sampled in step ``n`` stay on the device,
step ``n + 1`` is planned and launched with them fed from there (stand-ins in its ``token_ids``), and only then
are step ``n``'s tokens read back, checked for stops and streamed. A request that stops in step ``n`` has also
run in step ``n + 1``; that token is dropped. A step whose sampling needs the history on the host (a repetition
penalty) or that ends a request by length is read back at once, as without overlap. Outputs are the same tokens
either way; :meth:`~ContinuousBatchingEngine.step` returns a request finished by a stop one step later.

The engine runs either in the caller's thread (:meth:`ContinuousBatchingEngine.step`,
:meth:`~ContinuousBatchingEngine.generate`, or waiting on a :class:`RequestHandle`) or in a background thread
(:meth:`~ContinuousBatchingEngine.start`, or ``with engine:``), which :meth:`~ContinuousBatchingEngine.stream`
uses for asyncio. :meth:`~ContinuousBatchingEngine.submit` and :meth:`RequestHandle.cancel` may be called from
any thread; everything else the engine owns is touched by the engine's thread only.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from collections.abc import Sequence as SequenceOf
from typing import TypeVar, cast

import torch

from llamatelemetry_batch.serving.budget import TokenBudget
from llamatelemetry_batch.serving.handle import RequestHandle, TokenCallback
from llamatelemetry_batch.serving.sampling import (
    SamplingParams,
    make_generator,
    sample_next_tokens,
    sample_token_tensor,
)
from llamatelemetry_batch.serving.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from llamatelemetry_batch.serving.sequence import FinishReason, RequestOutput, Sequence, SequenceStatus
from llamatelemetry_batch.serving.text import Detokenize, IncrementalDetokenizer
from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.serving import DecoderModel, KVBlockManager, StepInput, TokenFeed

__all__ = ["ContinuousBatchingEngine", "RequestHandle", "TokenCallback"]


class ContinuousBatchingEngine:
    """Runs many generation requests over one decoder model, admitting new ones at every step.

    Args:
        model: any object implementing :class:`~llamatelemetry_core.serving.DecoderModel`.
        block_manager: the KV block manager (for a paged model, the one whose blocks the model's cache is
            indexed by, with the same ``page_size``); ``None`` for an unpaged model: a token budget of
            ``max_num_seqs * max_model_len`` tokens (:class:`TokenBudget`).
        scheduler_config: step limits (:class:`SchedulerConfig`).
        eos_token_ids: tokens that end every request (unless its ``ignore_eos``).
        detokenize: ``token_ids -> str`` (``tokenizer.decode``): enables text output and stop strings.
        overlap: plan and launch each step before the previous step's tokens are read back (see the module
            docstring); needs a model with ``accepts_token_feed`` and a block manager with
            ``replace_last_tokens``.

    Raises:
        ConfigurationError: ``model`` does not implement ``DecoderModel``, a paged model without a block
            manager, page sizes that differ, or ``overlap`` with a model or block manager that cannot take it.
    """

    def __init__(
        self,
        model: DecoderModel,
        block_manager: KVBlockManager | None = None,
        *,
        scheduler_config: SchedulerConfig | None = None,
        eos_token_ids: Iterable[int] = (),
        detokenize: Detokenize | None = None,
        overlap: bool = False,
    ) -> None:
        if not isinstance(model, DecoderModel):
            raise ConfigurationError(
                f"expected a model implementing llamatelemetry_core.serving.DecoderModel (vocab_size, max_model_len, "
                f"page_size, step, release), got {type(model).__name__}"
            )
        config = scheduler_config if scheduler_config is not None else SchedulerConfig()
        paged = model.page_size is not None
        if block_manager is None:
            if paged:
                raise ConfigurationError(
                    f"model {type(model).__name__} is paged (page_size {model.page_size}): pass the block_manager "
                    "whose blocks index its KV cache"
                )
            block_manager = TokenBudget(config.max_num_seqs * model.max_model_len)
        elif paged and isinstance(block_manager, TokenBudget):
            raise ConfigurationError(
                f"model {type(model).__name__} is paged (page_size {model.page_size}) and needs block tables; a "
                "TokenBudget has none: pass a paged block manager (SimpleBlockManager, or llamatelemetry-kvcache's)"
            )
        elif paged and block_manager.page_size != model.page_size:
            raise ConfigurationError(
                f"expected the block manager's page_size to equal the model's {model.page_size}, "
                f"got {block_manager.page_size}"
            )
        if not isinstance(overlap, bool):
            raise ConfigurationError(f"expected overlap to be True or False, got {overlap!r}")
        if overlap and getattr(model, "accepts_token_feed", False) is not True:
            raise ConfigurationError(
                f"overlap=True needs a model that takes tokens from the device (accepts_token_feed = True, see "
                f"llamatelemetry_core.serving.TokenFeed); {type(model).__name__} does not: pass overlap=False"
            )
        if overlap and not callable(getattr(block_manager, "replace_last_tokens", None)):
            raise ConfigurationError(
                f"overlap=True needs a block manager with replace_last_tokens (stand-in tokens are replaced once "
                f"read back); {type(block_manager).__name__} has none: pass overlap=False"
            )
        argmax = getattr(model, "argmax", None)
        if argmax is not None and not callable(argmax):
            raise ConfigurationError(
                f"expected the model's argmax to be a method (logits -> greedy token ids, see "
                f"llamatelemetry_core.serving.DecoderModel), got {type(argmax).__name__}"
            )
        self._argmax = argmax
        self.overlap = overlap
        self._pendings: deque[_PendingTokens] = deque()  # steps whose tokens are still on the device, oldest first
        self._to_accept: deque[tuple[Sequence, int, int, float]] = deque()  # read back, not handed out yet
        self._late_outputs: list[RequestOutput] = []
        self.model = model
        self.scheduler = Scheduler(block_manager, config, paged=paged, release=model.release)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.detokenize = detokenize
        self._ids = itertools.count()
        self._lock = threading.Condition()
        # Submissions (a sequence and its handle) and cancellations (a request id), in the order they came.
        self._inbox: deque[tuple[Sequence, RequestHandle] | int] = deque()
        self._live: dict[int, tuple[Sequence, RequestHandle]] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._step_lock = threading.Lock()  # one step at a time, whichever thread drives the loop
        self.num_steps = 0

    # --- submission (any thread) -------------------------------------------------------------------------------

    def submit(
        self,
        prompt_token_ids: SequenceOf[int],
        params: SamplingParams | None = None,
        *,
        on_token: TokenCallback | None = None,
        on_finish: Callable[[RequestOutput], None] | None = None,
    ) -> RequestHandle:
        """Queue a request; it joins the running batch at the next step. Safe from any thread.

        ``on_token`` (see :data:`TokenCallback`) and ``on_finish`` run on the engine's thread; an exception in
        ``on_token`` ends that request with :attr:`FinishReason.ERROR`, one in ``on_finish`` becomes a
        ``RuntimeWarning`` (the request is already done and the loop goes on).

        Raises:
            ConfigurationError: an empty prompt, token ids outside the vocabulary, a prompt that leaves no room
                under ``max_model_len``, or stop strings without a ``detokenize``.
            CapacityError: the request could not fit in the block manager even alone.
        """
        seq = self._new_sequence(prompt_token_ids, params)
        handle = RequestHandle(self, seq, on_token, on_finish)
        self._post((seq, handle))
        return handle

    def _new_sequence(self, prompt_token_ids: SequenceOf[int], params: SamplingParams | None) -> Sequence:
        """A checked request, not queued yet (see :meth:`submit` for what is raised)."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"expected params to be a SamplingParams or None, got {type(params).__name__}")
        prompt = self._check_prompt(prompt_token_ids)
        if params.stop and self.detokenize is None:
            raise ConfigurationError("stop strings need text: pass detokenize=tokenizer.decode to the engine")
        seq = Sequence(next(self._ids), prompt, params, self.model.max_model_len)
        capacity = self.scheduler.max_tokens_per_sequence()
        if seq.max_num_tokens > capacity:
            raise CapacityError(
                f"a request of {seq.num_prompt_tokens} prompt tokens and up to {params.max_new_tokens} new ones needs "
                f"room for {seq.max_num_tokens} tokens, the block manager holds {capacity}; lower max_new_tokens or "
                "give the block manager more blocks"
            )
        if self.detokenize is not None:
            seq.detokenizer = IncrementalDetokenizer(self.detokenize, seq.num_prompt_tokens, params.stop)
        return seq

    def _check_prompt(self, prompt_token_ids: SequenceOf[int]) -> list[int]:
        given: object = prompt_token_ids
        if isinstance(given, str | bytes) or not isinstance(given, Iterable):
            raise TypeError(
                f"expected prompt_token_ids to be a sequence of token ids (ints), got {type(given).__name__}"
            )
        prompt: list[object] = list(given)
        vocab, limit = self.model.vocab_size, self.model.max_model_len
        if not prompt:
            raise ConfigurationError("expected a prompt of at least one token id, got an empty one")
        for position, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise ConfigurationError(
                    f"expected token ids in [0, {vocab}) (the model's vocab_size), got {token!r} at position {position}"
                )
        if len(prompt) >= limit:
            raise ConfigurationError(
                f"expected a prompt shorter than the model's max_model_len {limit} (room for one new token), got "
                f"{len(prompt)} tokens; truncate it"
            )
        return cast("list[int]", prompt)

    def _post(self, command: tuple[Sequence, RequestHandle] | int) -> None:
        with self._lock:
            self._inbox.append(command)
            self._lock.notify_all()

    # --- the loop ----------------------------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        """Whether requests wait or run (including submitted ones the loop has not seen yet)."""
        with self._lock:
            return bool(self._live) or any(not isinstance(command, int) for command in self._inbox)

    @property
    def running_in_background(self) -> bool:
        """Whether a background thread runs the loop."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def step(self) -> list[RequestOutput]:
        """Run one step in the calling thread; returns the outputs of the requests that finished in it.

        Raises:
            RuntimeError: a background thread runs the loop (submit and wait instead).
        """
        if self.running_in_background and threading.current_thread() is not self._thread:
            raise RuntimeError("the engine runs in a background thread; submit requests and wait on their handles")
        with self._step_lock:
            return self._step()

    def _step(self) -> list[RequestOutput]:
        # Outputs finished by a step that then raised come back from the next call: none is lost.
        finished, self._late_outputs = self._late_outputs, []
        try:
            self._run_step(finished)
        except BaseException:
            self._late_outputs = finished
            raise
        return finished

    def _run_step(self, finished: list[RequestOutput]) -> None:
        self._drain_inbox(finished)
        if self._to_accept or len(self._pendings) > 1:
            # An earlier step stopped part-way (Ctrl-C, a failing callback): settle it before planning, so that
            # no stand-in older than the last step is ever appended past.
            self._settle(finished)
        if not self._live:
            self._settle(finished)
            return
        plan = self.scheduler.schedule()
        pending = self._pendings[-1] if self._pendings else None
        if plan.empty:
            if pending is not None:  # what runs next depends on the tokens still on the device
                self._settle(finished)
                return
            raise RuntimeError(
                f"the scheduler planned nothing with {len(self._live)} unfinished requests "
                f"({self.scheduler.num_waiting} waiting); this is a bug in llamatelemetry-batch"
            )
        step_input = plan.step_input
        if pending is not None:
            feed = self._feed(plan, pending)
            if feed is not None:
                step_input = StepInput(step_input.sequences, feed)
        try:
            logits = self.model.step(step_input)
            self._check_logits(logits, plan)  # before anything is recorded: a failed step can be run again
        except BaseException:
            self._settle(finished)  # the tokens already sampled are delivered; the stand-ins become real
            raise
        self.num_steps += 1
        self.scheduler.complete_step(plan)
        seqs = plan.logits_sequences
        if seqs and self.overlap and self._can_defer(seqs):
            # This step's tokens stay on the device until the next step has been launched with them.
            self._defer(logits, seqs)
            if pending is not None:
                self._resolve_oldest(finished)
        else:
            self._settle(finished)  # first: the tokens of the last step come before this step's
            if seqs:
                self._sample_and_stream(logits, plan, finished)
        if not self._live:
            self._settle(finished)

    # --- overlap: tokens read back one step late ----------------------------------------------------------------

    @staticmethod
    def _can_defer(seqs: list[Sequence]) -> bool:
        """Whether this step's tokens may stay on the device for a step: no request needs its history on the
        host to sample (a repetition penalty), and none ends by length with this token (the next step must not
        run it past its limit)."""
        for seq in seqs:
            if seq.params.repetition_penalty != 1.0 or seq.num_tokens + 1 >= seq.max_num_tokens:
                return False
        return True

    def _defer(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """Sample on the device, start the copy back to the host, and append a stand-in token to each request."""
        self._ensure_generators(seqs, logits.device)
        params, generators = [s.params for s in seqs], [s.generator for s in seqs]
        tokens = sample_token_tensor(logits, params, generators, [()] * len(seqs), argmax=self._argmax)
        if tokens.device.type == "cuda":
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            event: torch.cuda.Event | None = torch.cuda.Event()  # type: ignore[no-untyped-call]
            assert event is not None
            # On the stream the copy went to: the tokens' device, which need not be this thread's current one.
            event.record(torch.cuda.current_stream(tokens.device))
        else:
            host, event = tokens, None
        positions = [len(seq.token_ids) for seq in seqs]
        pending = _PendingTokens(seqs, positions, tokens, host, event)
        for seq in seqs:
            seq.token_ids.append(0)
            seq.stand_ins += 1
        self._pendings.append(pending)

    @staticmethod
    def _feed(plan: ScheduledStep, pending: _PendingTokens) -> TokenFeed | None:
        """Which of the planned steps take their token from ``pending`` (a decode of a stand-in)."""
        row_of, positions = pending.row_of, pending.positions
        rows: list[int] = []
        fed = False
        for seq, step in zip(plan.sequences, plan.step_input.sequences, strict=True):
            row = row_of.get(seq.seq_id, -1)
            if row >= 0:
                position = positions[row]
                if step.start_pos == position and len(step.token_ids) == 1:
                    rows.append(row)
                    fed = True
                    continue
                if step.start_pos <= position < step.end_pos:
                    raise RuntimeError(
                        f"sequence {seq.seq_id}: a step of {len(step.token_ids)} tokens from position "
                        f"{step.start_pos} holds a token not read back yet; this is a bug in llamatelemetry-batch"
                    )
            rows.append(-1)
        return TokenFeed(pending.tokens, tuple(rows)) if fed else None

    def _settle(self, finished: list[RequestOutput]) -> None:
        """Read back and hand out every token still on the device or not handed out yet."""
        while self._pendings:
            self._resolve_oldest(finished)
        self._hand_out(finished)

    def _resolve_oldest(self, finished: list[RequestOutput]) -> None:
        """Read back the oldest step's tokens, put them in place of their stand-ins (in the requests and in the
        block manager), then hand them out. Only once every value is in place is the step taken off the queue:
        an interruption while waiting for the device leaves it to be read again."""
        pending = self._pendings[0]
        if pending.event is not None:
            pending.event.synchronize()
        tokens: list[int] = pending.host.tolist()
        now = time.perf_counter()
        fix_ids: list[int] = []
        fix_tokens: list[int] = []
        accepted: list[tuple[Sequence, int, int, float]] = []
        for seq, position, token in zip(pending.seqs, pending.positions, tokens, strict=True):
            if seq.status is SequenceStatus.FINISHED:  # stopped or cancelled meanwhile: its stand-in went too
                continue
            seq.token_ids[position] = token
            seq.stand_ins -= 1
            if seq.num_allocated_tokens == position + 1:  # a step since holds it: the block manager has it last
                fix_ids.append(seq.seq_id)
                fix_tokens.append(token)
            accepted.append((seq, position, token, now))
        if fix_ids:
            self.scheduler.block_manager.replace_last_tokens(fix_ids, fix_tokens)  # type: ignore[attr-defined]
        self._pendings.popleft()
        self._to_accept.extend(accepted)
        self._hand_out(finished)

    def _hand_out(self, finished: list[RequestOutput]) -> None:
        """Stream the tokens read back and finish the requests they stop, one at a time, so that a callback that
        raises ``KeyboardInterrupt`` leaves the rest for the next step."""
        todo = self._to_accept
        while todo:
            seq, position, token, now = todo.popleft()
            if seq.status is SequenceStatus.FINISHED:
                continue
            # A later stand-in (this request is in the step now running) is set aside while the token is
            # handed out, so that stops and text see the tokens up to this one only.
            later = seq.token_ids[position + 1 :]
            if later:
                del seq.token_ids[position + 1 :]
                seq.stand_ins -= len(later)
            try:
                self._accept(seq, token, now, finished)
            finally:
                if later and not seq.finished:
                    seq.token_ids.extend(later)
                    seq.stand_ins += len(later)

    def _ensure_generators(self, seqs: list[Sequence], device: torch.device) -> None:
        for seq in seqs:
            if seq.generator is None and seq.params.seed is not None and not seq.params.greedy:
                seq.generator = make_generator(seq.params.seed, device)

    def _check_logits(self, logits: torch.Tensor, plan: ScheduledStep) -> None:
        expected = (len(plan.logits_sequences), self.model.vocab_size)
        if tuple(logits.shape) != expected or not logits.is_floating_point():
            raise ConfigurationError(
                f"expected the model to return float logits of shape {list(expected)} (one row per sequence with "
                f"want_logits, DecoderModel.step's contract), got {list(logits.shape)} {logits.dtype}"
            )

    def _sample_and_stream(self, logits: torch.Tensor, plan: ScheduledStep, finished: list[RequestOutput]) -> None:
        seqs = plan.logits_sequences
        self._ensure_generators(seqs, logits.device)
        tokens = sample_next_tokens(
            logits,
            [s.params for s in seqs],
            [s.generator for s in seqs],
            [s.token_ids if s.params.repetition_penalty != 1.0 else () for s in seqs],
            argmax=self._argmax,
        )
        now = time.perf_counter()
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.status is SequenceStatus.FINISHED:  # stopped by the token read back just before (overlap)
                continue
            seq.token_ids.append(token)
            self._accept(seq, token, now, finished)

    def _accept(self, seq: Sequence, token: int, now: float, finished: list[RequestOutput]) -> bool:
        """Record and stream ``token``, the newest of ``seq.token_ids``; finish the request if it stops there.
        Returns whether it finished."""
        metrics = seq.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.token_times.append(now)
        params = seq.params
        reason = None
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            reason = FinishReason.STOP
        handle = self._live[seq.seq_id][1]
        try:
            text = ""
            if seq.detokenizer is not None:
                text, stopped = seq.detokenizer.add(seq.token_ids)
                if stopped:
                    reason = FinishReason.STOP
            if reason is None and seq.num_tokens >= seq.max_num_tokens:
                reason = FinishReason.LENGTH
            handle._deliver(token)
            if handle._on_token is not None:
                handle._on_token(token, text)
        except Exception as exc:  # a callback or the detokenizer failed: that request ends, the others go on
            seq.error = exc
            reason = FinishReason.ERROR
        if reason is None:
            return False
        finished.append(self._finish(seq, reason))
        return True

    def _drain_inbox(self, finished: list[RequestOutput]) -> None:
        with self._lock:
            commands, self._inbox = self._inbox, deque()
        for command in commands:
            if isinstance(command, int):
                if command in self._live:
                    finished.append(self._finish(self._live[command][0], FinishReason.CANCELLED))
            else:
                seq, _ = command
                self._live[seq.seq_id] = command
                self.scheduler.add(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> RequestOutput:
        """Free the sequence's blocks now and hand its output to its handle."""
        if seq.stand_ins:  # tokens still on the device (overlap) are not part of the output
            del seq.token_ids[-seq.stand_ins :]
            seq.stand_ins = 0
        self.scheduler.finish(seq, reason)
        _, handle = self._live.pop(seq.seq_id)
        text = None
        detokenizer = seq.detokenizer
        if detokenizer is not None:
            tail = ""
            try:
                tail = detokenizer.finish(seq.token_ids)
            except Exception as exc:
                seq.error, reason = seq.error or exc, FinishReason.ERROR
            if tail and handle._on_token is not None and reason is not FinishReason.ERROR:
                try:
                    handle._on_token(None, tail)
                except Exception as exc:
                    seq.error, reason = exc, FinishReason.ERROR
            text = detokenizer.text
        seq.metrics.finished_time = time.perf_counter()
        output = RequestOutput(
            request_id=seq.seq_id,
            prompt_token_ids=tuple(seq.token_ids[: seq.num_prompt_tokens]),
            output_token_ids=tuple(seq.output_token_ids),
            text=text,
            finish_reason=reason,
            metrics=seq.metrics,
            error=seq.error,
        )
        handle._complete(output)
        return output

    # --- convenience -------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts_token_ids: SequenceOf[SequenceOf[int]],
        sampling_params: SamplingParams | SequenceOf[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion and return the outputs in the order of the prompts.

        ``sampling_params`` is one for all, or one per prompt. Runs the loop in the calling thread unless a
        background thread runs it.

        Raises:
            ConfigurationError: a list of sampling parameters whose length differs from the prompts', or a bad
                prompt (named by its index; then no prompt runs).
            CapacityError: a prompt that could not fit even alone (named by its index; then no prompt runs).
        """
        given: object = prompts_token_ids
        if isinstance(given, str | bytes) or not isinstance(given, SequenceOf):
            raise TypeError(
                f"expected prompts_token_ids to be a list of prompts (each a list of token ids), got "
                f"{type(given).__name__}"
            )
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            per_prompt = [sampling_params] * len(prompts_token_ids)
        else:
            if not isinstance(sampling_params, Iterable):
                raise TypeError(
                    f"expected sampling_params to be a SamplingParams, one per prompt, or None, got "
                    f"{type(sampling_params).__name__}"
                )
            per_prompt = list(sampling_params)
            if len(per_prompt) != len(prompts_token_ids):
                raise ConfigurationError(
                    f"expected one SamplingParams or one per prompt ({len(prompts_token_ids)}), got {len(per_prompt)}"
                )
        # Every prompt is checked before any is queued: a bad one raises and nothing runs.
        checked = []
        for index, (prompt, params) in enumerate(zip(prompts_token_ids, per_prompt, strict=True)):
            try:
                checked.append(self._new_sequence(prompt, params))
            except (ConfigurationError, CapacityError, TypeError) as exc:
                raise type(exc)(f"prompt {index}: {exc}") from exc
        handles = [RequestHandle(self, seq, None, None) for seq in checked]
        with self._lock:
            self._inbox.extend((h._seq, h) for h in handles)
            self._lock.notify_all()
        return [h.result() for h in handles]

    def start(self) -> None:
        """Run the loop in a background thread (idle while nothing is submitted)."""
        with self._lock:
            if self.running_in_background:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="llamatelemetry-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background thread after its current step; unfinished requests are cancelled."""
        with self._lock:
            thread = self._thread
            self._stopping = True
            self._lock.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> ContinuousBatchingEngine:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._inbox and not self._live:
                    self._lock.wait()
                stopping = self._stopping
            if stopping:
                self._cancel_all(None)
                return
            try:
                with self._step_lock:
                    self._step()
            except BaseException as exc:  # the model failed: every unfinished request gets the error
                self._cancel_all(exc)
                return

    def _cancel_all(self, error: BaseException | None) -> None:
        finished: list[RequestOutput] = []
        # Every request ends now: tokens already read back are handed out, those still on the device are dropped.
        self._pendings.clear()
        self._hand_out(finished)
        self._drain_inbox(finished)
        for seq, _ in list(self._live.values()):
            seq.error = error
            self._finish(seq, FinishReason.CANCELLED if error is None else FinishReason.ERROR)

    async def stream(
        self, prompt_token_ids: SequenceOf[int], params: SamplingParams | None = None
    ) -> AsyncIterator[int]:
        """Submit a request and yield its token ids as they are generated (asyncio).

        Starts the background thread if it is not running. Leaving the ``async for`` early (or cancelling the
        task) cancels the request.

        Raises:
            RuntimeError: the request failed (the model, the detokenizer or a callback raised); chained.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | RequestOutput | None] = asyncio.Queue()
        handle = self.submit(
            prompt_token_ids,
            params,
            on_token=lambda token, _: _put_threadsafe(loop, queue, token),
            on_finish=lambda output: _put_threadsafe(loop, queue, output),
        )
        self.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, RequestOutput):
                    if item.error is not None:
                        raise RuntimeError(f"request {item.request_id} failed: {item.error}") from item.error
                    return
                if item is not None:
                    yield item
        finally:
            if not handle.done():
                handle.cancel()


class _PendingTokens:
    """The tokens of one step, sampled on the device and being copied back (``event`` marks the copy's end)."""

    __slots__ = ("event", "host", "positions", "row_of", "seqs", "tokens")

    def __init__(
        self,
        seqs: list[Sequence],
        positions: list[int],
        tokens: torch.Tensor,
        host: torch.Tensor,
        event: torch.cuda.Event | None,
    ) -> None:
        self.seqs = seqs
        self.positions = positions  # where each request's stand-in sits in its token_ids
        self.tokens = tokens
        self.host = host
        self.event = event
        self.row_of = {seq.seq_id: row for row, seq in enumerate(seqs)}


_Item = TypeVar("_Item")


def _put_threadsafe(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[_Item], item: _Item) -> None:
    """Hand ``item`` to a consumer on ``loop``; once that loop is closed, the consumer is gone and so is the item."""
    if loop.is_closed():
        return
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # closed between the check and the call
        return
