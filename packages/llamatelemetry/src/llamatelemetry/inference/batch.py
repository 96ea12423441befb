"""Batch inference over any inference function, and continuous batching (``pip install "llamatelemetry[batch]"``).

Re-exports ``llamatelemetry_batch``.
"""

from llamatelemetry._components import missing_component
from llamatelemetry._components import reexported as _reexported

try:
    from llamatelemetry_batch import BatchConfig as BatchConfig
    from llamatelemetry_batch import BatchedFunction as BatchedFunction
    from llamatelemetry_batch import BatchInferenceError as BatchInferenceError
    from llamatelemetry_batch import BatchInferenceOptimizer as BatchInferenceOptimizer
    from llamatelemetry_batch import BatchInterrupted as BatchInterrupted
    from llamatelemetry_batch import BatchRun as BatchRun
    from llamatelemetry_batch import BatchStats as BatchStats
    from llamatelemetry_batch import CallTimeoutError as CallTimeoutError
    from llamatelemetry_batch import ContinuousBatchingEngine as ContinuousBatchingEngine
    from llamatelemetry_batch import FinishReason as FinishReason
    from llamatelemetry_batch import InferenceConnectionError as InferenceConnectionError
    from llamatelemetry_batch import InferenceHTTPError as InferenceHTTPError
    from llamatelemetry_batch import InferenceResponseError as InferenceResponseError
    from llamatelemetry_batch import InferenceTimeoutError as InferenceTimeoutError
    from llamatelemetry_batch import OpenAICompatibleClient as OpenAICompatibleClient
    from llamatelemetry_batch import OversizePromptWarning as OversizePromptWarning
    from llamatelemetry_batch import RequestHandle as RequestHandle
    from llamatelemetry_batch import RequestMetrics as RequestMetrics
    from llamatelemetry_batch import RequestOutput as RequestOutput
    from llamatelemetry_batch import SamplingParams as SamplingParams
    from llamatelemetry_batch import Scheduler as Scheduler
    from llamatelemetry_batch import SchedulerConfig as SchedulerConfig
    from llamatelemetry_batch import SimpleBlockManager as SimpleBlockManager
    from llamatelemetry_batch import batch_inference_optimized as batch_inference_optimized
    from llamatelemetry_batch import batched as batched
    from llamatelemetry_batch import estimate_tokens as estimate_tokens
    from llamatelemetry_batch import is_transient_error as is_transient_error
except ImportError as exc:
    raise missing_component("batch", exc) from exc

__all__ = _reexported("batch", globals())
del _reexported
