"""What an inference function is: one prompt in, one result out; or, declared with :func:`batched`, a list.

``batch_infer`` calls a plain function once per prompt (``fn(prompt, **kwargs) -> result``, the guide's
``engine.infer``). A function that takes a list of prompts and returns one result per prompt, in order
(``fn(prompts, **kwargs) -> results``, e.g. a local model's batched ``generate``) must say so, because the two
cannot be told apart by looking at them::

    @batched
    def generate(prompts: list[str], max_new_tokens: int = 32) -> list[str]: ...

Either kind may be ``async def``; it is then awaited on an event loop.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar, overload

__all__ = ["BatchedFunction", "batched", "is_async_callable", "resolve_model_function"]

R = TypeVar("R")


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` returns a coroutine: an ``async def`` function, method, partial or ``__call__``."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if isinstance(fn, BatchedFunction):
        return fn.is_async
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(type(fn).__call__)


class BatchedFunction(Generic[R]):
    """An inference function that takes a list of prompts and returns a sequence of results, one per prompt.

    Made by :func:`batched`; calling it calls the wrapped function.
    """

    def __init__(self, fn: Callable[..., Sequence[R]] | Callable[..., Awaitable[Sequence[R]]]) -> None:
        if not callable(fn):
            raise TypeError(f"expected a callable taking a list of prompts, got {type(fn).__name__}")
        self.fn = fn
        self.is_async = is_async_callable(fn)
        functools.update_wrapper(self, fn)

    def __call__(self, prompts: list[str], **kwargs: Any) -> Any:
        return self.fn(prompts, **kwargs)

    def __repr__(self) -> str:
        return f"batched({getattr(self.fn, '__qualname__', self.fn)!r})"


@overload
def batched(fn: Callable[..., Awaitable[Sequence[R]]]) -> BatchedFunction[R]: ...


@overload
def batched(fn: Callable[..., Sequence[R]]) -> BatchedFunction[R]: ...


def batched(fn: Callable[..., Any]) -> BatchedFunction[Any]:
    """Declare that ``fn`` takes a list of prompts and returns one result per prompt, in the same order.

    Usable as a decorator or a wrapper (``batch_infer(prompts, batched(model.generate_many))``). With such a
    function ``batch_infer`` plans batches that respect ``max_batch_size`` and ``max_tokens`` and calls it once
    per batch. A returned sequence of the wrong length fails that batch.
    """
    return BatchedFunction(fn)


def resolve_model_function(model: object) -> Callable[..., Any]:
    """The inference function of ``model``: its ``infer`` method, else its ``generate`` method, else itself.

    Raises:
        TypeError: ``model`` has none of these.
    """
    for name in ("infer", "generate"):
        method = getattr(model, name, None)
        if callable(method):
            return method  # type: ignore[no-any-return]
    if callable(model):
        return model
    raise TypeError(
        "expected model to have an infer(prompt) or generate(prompt) method, or to be a callable taking one "
        f"prompt, got {type(model).__name__}; wrap it: batch_inference_optimized(prompts, lambda p: ...)"
    )
