"""Continuous batching: the engine's requests served by ``llamatelemetry-batch``'s scheduler and engine loop.

The scheduler admits waiting requests at every step as running ones finish (their blocks are freed at once),
splits long prompts into chunks under a token budget, reuses cached prompt prefixes of the paged cache, and
preempts by recomputation when blocks run out. The engine's runner is its ``DecoderModel``; with the paged
cache, the cache's block manager is the scheduler's. A request the batch engine refuses (prompt past the
context, more blocks than the cache) fails alone with that error; the others are served.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llamatelemetry_batch import ContinuousBatchingEngine, SchedulerConfig
from llamatelemetry_batch import SamplingParams as BatchSamplingParams
from llamatelemetry_core.errors import LlamaTelemetryError
from llamatelemetry_engine.sampling import SamplingParams
from llamatelemetry_engine.static_batching import Request, check_request

__all__ = ["ContinuousServer"]


def _params(p: SamplingParams) -> BatchSamplingParams:
    return BatchSamplingParams(
        max_new_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=p.seed,
        stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos,
    )  # fmt: skip


class ContinuousServer:
    """One ``ContinuousBatchingEngine`` over ``runner``, kept for the life of the engine (its scheduler owns
    the block manager's state)."""

    def __init__(
        self,
        runner: Any,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefix_reuse: bool,
        eos_token_ids: tuple[int, ...],
        admission_batch: int = 1,
        overlap: bool = False,
    ) -> None:
        self.runner = runner
        config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs),
            enable_prefix_reuse=prefix_reuse,
            admission_batch=admission_batch,
        )
        self.engine = ContinuousBatchingEngine(
            runner, runner.block_manager, scheduler_config=config, eos_token_ids=eos_token_ids, overlap=overlap
        )

    def run(self, requests: list[Request], on_token: Callable[[Request, int], None] | None = None) -> list[Request]:
        """Serve every request to completion (or to its error); return them in order."""
        handles = []
        for req in requests:
            error = check_request(req, self.runner.max_model_len, self.runner.block_manager, self.runner.vocab_size)
            if error is None:
                try:
                    callback = None if on_token is None else _forward(req, on_token)
                    handles.append((req, self.engine.submit(req.prompt_ids, _params(req.params), on_token=callback)))
                    continue
                except LlamaTelemetryError as exc:
                    error = exc
            req.error, req.finish_reason = error, "error"
        while self.engine.has_unfinished:
            self.engine.step()
        for req, handle in handles:
            out = handle.result()
            req.output_ids = list(out.output_token_ids)
            req.token_times = list(out.metrics.token_times)
            req.arrival_time = out.metrics.arrival_time
            req.finish_reason = out.finish_reason.value if out.finish_reason is not None else "error"
            if out.error is not None:
                req.error = out.error if isinstance(out.error, Exception) else RuntimeError(str(out.error))
        return requests


def _forward(req: Request, on_token: Callable[[Request, int], None]) -> Callable[[int | None, str], None]:
    def callback(token: int | None, _: str) -> None:
        if token is not None:
            on_token(req, token)

    return callback
