"""llamatelemetry-engine: a Llama-family inference engine composed of every llamatelemetry optimization.

* :class:`LLM`: load a model (the embedded SmolLM2-135M-Instruct, a GGUF file, a transformers checkpoint folder,
  an in-memory transformers model, or seeded random weights) and generate: batched, streamed, or in chat form.
* :class:`EngineFlags`: one switch per optimization (Tensor Core dtype, Triton fused kernels, FlashAttention,
  paged KV cache, prefix caching, CUDA graphs, continuous batching); all off is plain PyTorch.
* :class:`ModelRunner`: the model behind core's ``DecoderModel`` protocol, for any scheduler.
* :func:`load_model`, :class:`ModelConfig` and its :data:`PRESETS`.
"""

from llamatelemetry_engine.__about__ import __version__
from llamatelemetry_engine.config import ARCHITECTURES, PRESETS, ModelConfig, RopeScaling
from llamatelemetry_engine.engine import LLM, Completion, build_model
from llamatelemetry_engine.errors import ModelLoadError, PromptTooLongError, RequestTooLargeError
from llamatelemetry_engine.flags import FLAG_NAMES, EngineFlags, FlagState, ResolvedFlags, resolve_flags
from llamatelemetry_engine.loader import LoadedModel, embedded_model_path, load_model, random_weights
from llamatelemetry_engine.runner import ModelRunner
from llamatelemetry_engine.sampling import SamplingParams, sample

__all__ = [
    "ARCHITECTURES",
    "FLAG_NAMES",
    "LLM",
    "PRESETS",
    "Completion",
    "EngineFlags",
    "FlagState",
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "ModelRunner",
    "PromptTooLongError",
    "RequestTooLargeError",
    "ResolvedFlags",
    "RopeScaling",
    "SamplingParams",
    "__version__",
    "build_model",
    "embedded_model_path",
    "load_model",
    "random_weights",
    "resolve_flags",
    "sample",
]
