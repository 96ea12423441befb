"""Continuous batching for PyTorch decoder models: a scheduler, sampling, and an engine loop.

The engine drives any :class:`~llamatelemetry_core.serving.DecoderModel` and takes KV blocks from any
:class:`~llamatelemetry_core.serving.KVBlockManager` (``llamatelemetry-kvcache``'s paged cache, or the
:class:`SimpleBlockManager` here); it imports neither, they meet in ``llamatelemetry_core.serving``.
"""

from llamatelemetry_batch.serving.budget import SimpleBlockManager, TokenBudget
from llamatelemetry_batch.serving.engine import ContinuousBatchingEngine, RequestHandle
from llamatelemetry_batch.serving.sampling import SamplingParams, sample_next_tokens
from llamatelemetry_batch.serving.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from llamatelemetry_batch.serving.sequence import FinishReason, RequestMetrics, RequestOutput, Sequence, SequenceStatus
from llamatelemetry_batch.serving.text import IncrementalDetokenizer

__all__ = [
    "ContinuousBatchingEngine",
    "FinishReason",
    "IncrementalDetokenizer",
    "RequestHandle",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "ScheduledStep",
    "Scheduler",
    "SchedulerConfig",
    "Sequence",
    "SequenceStatus",
    "SimpleBlockManager",
    "TokenBudget",
    "sample_next_tokens",
]
