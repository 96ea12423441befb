"""``BatchInferenceOptimizer``: run many prompts through any inference function, in order, losing nothing.

    optimizer = BatchInferenceOptimizer(BatchConfig(max_batch_size=8, max_tokens=2048, dynamic_batching=True))
    results = optimizer.batch_infer(prompts, engine.infer, max_tokens=64)  # keyword arguments go to engine.infer

A one-prompt function (``fn(prompt, **kwargs) -> result``) is called with up to ``max_batch_size`` calls in
flight, within the ``max_tokens`` budget of estimated prompt tokens in flight. A list function, declared with
:func:`~llamatelemetry_batch.functions.batched`, is called once per planned batch (``max_batch_size`` prompts
and ``len(batch) * longest <= max_tokens``, grouped by length with ``dynamic_batching``), one batch at a time.
``async def`` functions are awaited on an event loop; :meth:`BatchInferenceOptimizer.abatch_infer` serves
asyncio callers.

Failures: a call that raises a transient error is retried with backoff; one bad prompt of a batch is isolated by
splitting the batch. When prompts still fail, the other results are kept: by default every prompt runs and then
:class:`~llamatelemetry_batch.errors.BatchInferenceError` is raised carrying all results and the failures;
``BatchConfig(stop_on_error=True)`` stops starting calls at the first failure instead. Ctrl-C stops new calls
and raises :class:`~llamatelemetry_batch.errors.BatchInterrupted` with what completed.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from llamatelemetry_batch.config import BatchConfig
from llamatelemetry_batch.dispatch import Dispatcher, WorkItem, plan_batches
from llamatelemetry_batch.errors import BatchInferenceError
from llamatelemetry_batch.functions import BatchedFunction, is_async_callable, resolve_model_function
from llamatelemetry_batch.progress import open_progress
from llamatelemetry_batch.runner import Job, run_async, run_sync
from llamatelemetry_batch.stats import BatchStats

__all__ = ["BatchInferenceOptimizer", "BatchRun", "OversizePromptWarning", "batch_inference_optimized"]

R = TypeVar("R")


class OversizePromptWarning(UserWarning):
    """A prompt is estimated over ``BatchConfig.max_tokens``: it runs, alone."""


@dataclass(frozen=True)
class BatchRun:
    """The record of the last run of an optimizer, however it ended (also after a cancelled ``abatch_infer``).

    ``results`` has one entry per prompt (``None`` without a result); ``errors`` maps failed prompt indices to
    their errors; ``not_run`` lists prompts never completed; ``stats`` is the run's :class:`BatchStats`.
    """

    results: list[Any]
    errors: dict[int, BaseException]
    not_run: list[int]
    stats: BatchStats


class BatchInferenceOptimizer:
    """Runs lists of prompts through an inference function as :class:`BatchConfig` says.

    ``last_run`` and ``last_stats`` describe the most recent run of this optimizer (``None`` before the first).
    One optimizer may serve runs from several threads at once; ``last_run`` is then whichever ended last.
    """

    def __init__(self, config: BatchConfig | None = None) -> None:
        if config is not None and not isinstance(config, BatchConfig):
            raise TypeError(f"expected config to be a BatchConfig, got {type(config).__name__}")
        self.config = config or BatchConfig()
        self.last_run: BatchRun | None = None

    @property
    def last_stats(self) -> BatchStats | None:
        """Statistics of the last run: requests/s, latency percentiles, failures, retries."""
        return None if self.last_run is None else self.last_run.stats

    @overload
    def batch_infer(self, prompts: Iterable[str], inference_fn: BatchedFunction[R], **kwargs: Any) -> list[R]: ...

    @overload
    def batch_infer(
        self, prompts: Iterable[str], inference_fn: Callable[..., Awaitable[R]], **kwargs: Any
    ) -> list[R]: ...

    @overload
    def batch_infer(self, prompts: Iterable[str], inference_fn: Callable[..., R], **kwargs: Any) -> list[R]: ...

    def batch_infer(self, prompts: Iterable[str], inference_fn: Callable[..., Any], **kwargs: Any) -> list[Any]:
        """Run every prompt through ``inference_fn``; return the results in the order of ``prompts``.

        Args:
            prompts: the prompts, each a ``str``.
            inference_fn: ``fn(prompt, **kwargs) -> result``, or a :func:`batched` list function; either may be
                ``async def``.
            **kwargs: passed to every call of ``inference_fn``.

        Raises:
            TypeError: ``prompts`` is not a collection of strings, or ``inference_fn`` is not callable; raised
                before any call.
            BatchInferenceError: some prompts failed; it carries every result and the failures.
            BatchInterrupted: Ctrl-C (or ``KeyboardInterrupt`` from the function) stopped the run; it carries
                what completed.
            ImportError: ``progress`` asks for a bar library that is not installed.
        """
        job = self._prepare(prompts, inference_fn, kwargs)
        if job is None:
            return []
        try:
            run_sync(job)
        finally:
            self._finish(job)
        return self._results_or_raise(job)

    @overload
    async def abatch_infer(
        self, prompts: Iterable[str], inference_fn: BatchedFunction[R], **kwargs: Any
    ) -> list[R]: ...

    @overload
    async def abatch_infer(
        self, prompts: Iterable[str], inference_fn: Callable[..., Awaitable[R]], **kwargs: Any
    ) -> list[R]: ...

    @overload
    async def abatch_infer(self, prompts: Iterable[str], inference_fn: Callable[..., R], **kwargs: Any) -> list[R]: ...

    async def abatch_infer(self, prompts: Iterable[str], inference_fn: Callable[..., Any], **kwargs: Any) -> list[Any]:
        """:meth:`batch_infer` for asyncio callers: async functions run on the running loop, others in threads.

        Cancelling the awaiting task cancels the calls in flight and starts no more; what completed is in
        ``last_run``. Raises as :meth:`batch_infer` does.
        """
        job = self._prepare(prompts, inference_fn, kwargs)
        if job is None:
            return []
        try:
            interrupted = await run_async(job)
        finally:
            self._finish(job)
        if interrupted:
            raise job.interrupted(time.monotonic())
        return self._results_or_raise(job)

    # --- internals --------------------------------------------------------------------------------------------------

    def _prepare(self, prompts: Iterable[str], inference_fn: Callable[..., Any], kwargs: dict[str, Any]) -> Job | None:
        prompt_list = _check_prompts(prompts)
        if not callable(inference_fn):
            raise TypeError(
                f"expected inference_fn to be a callable taking one prompt (or a batched(...) list function), "
                f"got {type(inference_fn).__name__}"
            )
        if not prompt_list:
            self.last_run = BatchRun([], {}, [], Dispatcher([], 0, self.config, max_in_flight=1).stats(0.0))
            return None
        config = self.config
        tokens = [config.count_tokens(p) for p in prompt_list]
        _warn_oversize(tokens, config.max_tokens)
        takes_list = isinstance(inference_fn, BatchedFunction)
        if takes_list:

            def batch_cost(indices: Sequence[int]) -> int:
                return len(indices) * max(tokens[i] for i in indices)

            batches = plan_batches(tokens, config.max_batch_size, config.max_tokens, by_length=config.dynamic_batching)
            items = [WorkItem((k,), tuple(b), batch_cost(b)) for k, b in enumerate(batches)]
            dispatcher = Dispatcher(items, len(prompt_list), config, max_in_flight=1, batch_tokens=batch_cost)
        else:
            items = [WorkItem((i,), (i,), t) for i, t in enumerate(tokens)]
            dispatcher = Dispatcher(items, len(prompt_list), config, max_in_flight=config.max_batch_size)
        return Job(
            prompts=prompt_list,
            fn=inference_fn.fn if isinstance(inference_fn, BatchedFunction) else inference_fn,
            kwargs=kwargs,
            takes_list=takes_list,
            is_async=is_async_callable(inference_fn),
            timeout=config.timeout,
            dispatcher=dispatcher,
            progress=open_progress(config.progress, len(prompt_list)),
        )

    def _finish(self, job: Job) -> None:
        job.progress.close()
        d = job.dispatcher
        self.last_run = BatchRun(list(d.results), dict(d.errors), d.not_run(), d.stats(time.monotonic()))

    def _results_or_raise(self, job: Job) -> list[Any]:
        run = self.last_run
        assert run is not None
        if run.errors:
            raise BatchInferenceError(run.results, run.errors, run.not_run, run.stats)
        return run.results


def _check_prompts(prompts: object) -> list[str]:
    if isinstance(prompts, str | bytes):
        raise TypeError(
            f"expected prompts to be a list of strings, got a single {type(prompts).__name__}; use [prompt]"
        )
    if isinstance(prompts, Mapping) or not isinstance(prompts, Iterable):
        raise TypeError(f"expected prompts to be a list of strings, got {type(prompts).__name__}")
    prompt_list = list(prompts)
    for index, prompt in enumerate(prompt_list):
        if not isinstance(prompt, str):
            raise TypeError(
                f"expected every prompt to be a str, got {type(prompt).__name__} at index {index} ({prompt!r:.60}); "
                "no call was made"
            )
    return prompt_list


def _warn_oversize(tokens: Sequence[int], max_tokens: int) -> None:
    over = [t for t in tokens if t > max_tokens]
    if over:
        warnings.warn(
            f"{len(over)} prompt(s) are estimated over BatchConfig.max_tokens={max_tokens} (the longest "
            f"{max(over)} tokens); each runs alone. Raise max_tokens if the engine can take them together.",
            OversizePromptWarning,
            stacklevel=4,
        )


def batch_inference_optimized(
    prompts: Iterable[str],
    model: object,
    max_batch_size: int | None = None,
    *,
    config: BatchConfig | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``prompts`` through ``model`` with a :class:`BatchInferenceOptimizer`; results in prompt order.

    ``model`` is used through its ``infer`` method, else its ``generate`` method, else by calling it, with one
    prompt per call (or a list, if that method is :func:`batched`). ``max_batch_size`` defaults to 8, or to
    ``config.max_batch_size`` when a ``config`` is given; ``**kwargs`` go to every call.

    Raises:
        TypeError: ``model`` has no ``infer``/``generate`` method and is not callable, or a prompt is not a str.
        BatchInferenceError, BatchInterrupted: as :meth:`BatchInferenceOptimizer.batch_infer`.
    """
    fn = resolve_model_function(model)
    base = config or BatchConfig()
    if max_batch_size is not None and max_batch_size != base.max_batch_size:
        base = dataclasses.replace(base, max_batch_size=max_batch_size)
    return BatchInferenceOptimizer(base).batch_infer(prompts, fn, **kwargs)
