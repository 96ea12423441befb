"""llamatelemetry-batch: Batching and continuous batching for LLM inference.

Documented import path: ``llamatelemetry.inference.batch``.

- :class:`BatchConfig`, :class:`BatchInferenceOptimizer`, :func:`batch_inference_optimized`: run many prompts
  through any inference function (a local model, or an HTTP engine such as llama-server) with bounded
  concurrency, a token budget, timeouts and retries, results in prompt order, failures reported, never lost.
- :class:`OpenAICompatibleClient`: a ready inference function for OpenAI-compatible servers (needs
  ``pip install "llamatelemetry-batch[http]"``).
- :mod:`llamatelemetry_batch.serving`: the continuous-batching scheduler and engine loop.
"""

from llamatelemetry_batch.__about__ import __version__
from llamatelemetry_batch.config import BatchConfig, estimate_tokens
from llamatelemetry_batch.errors import (
    BatchInferenceError,
    BatchInterrupted,
    CallTimeoutError,
    InferenceConnectionError,
    InferenceHTTPError,
    InferenceResponseError,
    InferenceTimeoutError,
)
from llamatelemetry_batch.functions import BatchedFunction, batched
from llamatelemetry_batch.http import OpenAICompatibleClient
from llamatelemetry_batch.optimizer import (
    BatchInferenceOptimizer,
    BatchRun,
    OversizePromptWarning,
    batch_inference_optimized,
)
from llamatelemetry_batch.retry import is_transient_error
from llamatelemetry_batch.serving import (
    ContinuousBatchingEngine,
    FinishReason,
    RequestHandle,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SimpleBlockManager,
    TokenBudget,
)
from llamatelemetry_batch.stats import BatchStats

__all__ = [
    "BatchConfig",
    "BatchInferenceError",
    "BatchInferenceOptimizer",
    "BatchInterrupted",
    "BatchRun",
    "BatchStats",
    "BatchedFunction",
    "CallTimeoutError",
    "ContinuousBatchingEngine",
    "FinishReason",
    "InferenceConnectionError",
    "InferenceHTTPError",
    "InferenceResponseError",
    "InferenceTimeoutError",
    "OpenAICompatibleClient",
    "OversizePromptWarning",
    "RequestHandle",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "SimpleBlockManager",
    "TokenBudget",
    "__version__",
    "batch_inference_optimized",
    "batched",
    "estimate_tokens",
    "is_transient_error",
]
