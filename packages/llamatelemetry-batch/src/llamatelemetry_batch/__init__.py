"""llamatelemetry-batch: Batching and continuous batching for LLM inference.

Documented import path: ``llamatelemetry.inference.batch``.
"""

from llamatelemetry_batch.__about__ import __version__
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

__all__ = [
    "ContinuousBatchingEngine",
    "FinishReason",
    "RequestHandle",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "SimpleBlockManager",
    "TokenBudget",
    "__version__",
]
