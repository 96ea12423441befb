"""Static batching: take up to ``max_batch_size`` requests, run them until the longest finishes, repeat.

The baseline continuous batching is measured against (and what the engine runs with ``continuous_batching``
off). It drives any :class:`~llamatelemetry_core.serving.DecoderModel`; with a paged model it keeps the blocks
through the model's :class:`~llamatelemetry_core.serving.KVBlockManager` and admits a request only when the blocks
for its prompt and all its new tokens are free, so a batch never runs out mid-way. A request that can never run
(prompt past the context, more blocks than the whole cache) fails alone with its error; the others are served.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.serving import SequenceStep, StepInput
from llamatelemetry_engine.errors import PromptTooLongError, RequestTooLargeError
from llamatelemetry_engine.sampling import SamplingParams, sample

__all__ = ["Request", "StaticBatchEngine"]


@dataclass
class Request:
    """One generation request and what became of it (timestamps from ``time.perf_counter``)."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None
    arrival_time: float = 0.0
    token_times: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """Whether the request is done (finished, or failed with :attr:`error`)."""
        return self.finish_reason is not None


def check_request(
    request: Request, max_model_len: int, block_manager: Any, vocab_size: int | None = None
) -> Exception | None:
    """The error that keeps ``request`` from ever running, or ``None`` (token ids checked against ``vocab_size``)."""
    n = len(request.prompt_ids)
    if n == 0:
        return PromptTooLongError(f"request {request.request_id}: expected a prompt of at least one token, got none")
    if vocab_size is not None and not 0 <= min(request.prompt_ids) <= max(request.prompt_ids) < vocab_size:
        bad = next(t for t in request.prompt_ids if not 0 <= t < vocab_size)
        return ConfigurationError(
            f"request {request.request_id}: expected prompt token ids in [0, {vocab_size}) (the model's vocab_size), "
            f"got {bad}"
        )
    if n >= max_model_len:
        return PromptTooLongError(
            f"request {request.request_id}: prompt of {n} tokens, but the context holds {max_model_len} "
            "(prompt plus at least one new token); shorten the prompt or raise max_model_len"
        )
    if block_manager is not None:
        total = min(n + request.params.max_tokens, max_model_len)
        need = math.ceil(total / block_manager.page_size)
        if need > block_manager.num_blocks:
            return RequestTooLargeError(
                f"request {request.request_id}: {total} tokens need {need} KV blocks of {block_manager.page_size}, "
                f"the whole cache has {block_manager.num_blocks}; lower max_tokens or give the cache more memory"
            )
    return None


class StaticBatchEngine:
    """Runs requests through ``model`` in fixed batches. ``on_token(request, token_id)`` streams tokens."""

    def __init__(
        self, model: Any, *, max_batch_size: int, eos_token_ids: Sequence[int] = (), device: torch.device | None = None
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.block_manager = getattr(model, "block_manager", None) if model.page_size is not None else None

    def _finish_token(self, req: Request, token: int) -> None:
        req.output_ids.append(token)
        req.token_times.append(time.perf_counter())
        p = req.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            req.finish_reason = "stop"
        elif (
            len(req.output_ids) >= p.max_tokens or len(req.prompt_ids) + len(req.output_ids) >= self.model.max_model_len
        ):
            req.finish_reason = "length"

    def _admit(self, queue: list[Request]) -> list[Request]:
        batch: list[Request] = []
        free = self.block_manager.num_free_blocks if self.block_manager is not None else 0
        while queue and len(batch) < self.max_batch_size:
            req = queue[0]
            if self.block_manager is not None:
                total = min(len(req.prompt_ids) + req.params.max_tokens, self.model.max_model_len)
                need = math.ceil(total / self.block_manager.page_size)
                if need > free:
                    break
                free -= need
            batch.append(queue.pop(0))
        return batch

    def run(self, requests: Sequence[Request], on_token: Callable[[Request, int], None] | None = None) -> list[Request]:
        """Serve every request; return them (finished, or with :attr:`Request.error` set)."""
        bm = self.block_manager
        queue: list[Request] = []
        for req in requests:
            error = check_request(req, self.model.max_model_len, bm, self.model.vocab_size)
            if error is not None:
                req.error, req.finish_reason = error, "error"
            else:
                queue.append(req)
        generators = {
            r.request_id: torch.Generator().manual_seed(r.params.seed) for r in queue if r.params.seed is not None
        }
        while queue:
            batch = self._admit(queue)
            if not batch:  # nothing running holds blocks here, so the head can never fit: fail it, serve the rest
                req = queue.pop(0)
                req.error = RequestTooLargeError(f"request {req.request_id}: not enough free KV blocks")
                req.finish_reason = "error"
                continue
            steps = []
            for req in batch:
                cached = bm.allocate(req.request_id, req.prompt_ids) if bm is not None else 0
                table = tuple(bm.block_table(req.request_id)) if bm is not None else ()
                steps.append(SequenceStep(req.request_id, tuple(req.prompt_ids[cached:]), cached, table))
            running = batch
            while True:
                logits = self.model.step(StepInput(tuple(steps)))
                if all(r.params.greedy for r in running):  # one argmax and one device-to-host copy per step
                    tokens = sample(logits, running[0].params, argmax=getattr(self.model, "argmax", None))
                else:
                    tokens = [
                        sample(logits[i : i + 1], r.params, generators.get(r.request_id))[0]
                        for i, r in enumerate(running)
                    ]
                for req, token in zip(running, tokens, strict=True):
                    self._finish_token(req, token)
                    if on_token is not None:
                        on_token(req, token)
                running = [r for r in running if not r.finished]
                if not running:
                    break
                steps = []
                for req in running:
                    last = req.output_ids[-1]
                    if bm is not None:
                        bm.append(req.request_id, [last])
                    table = tuple(bm.block_table(req.request_id)) if bm is not None else ()
                    pos = len(req.prompt_ids) + len(req.output_ids) - 1
                    steps.append(SequenceStep(req.request_id, (last,), pos, table))
            for req in batch:
                if bm is not None:
                    bm.free(req.request_id)
                self.model.release(req.request_id)
        return list(requests)
