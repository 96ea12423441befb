"""Weights from a local transformers checkpoint folder (safetensors only) or an in-memory transformers model.

A folder needs ``config.json`` and ``model.safetensors`` (or shards listed by ``model.safetensors.index.json``);
tokenizer files, when present, give the tokenizer (through transformers). Pickled ``.bin`` checkpoints are
refused: loading them runs arbitrary code. Nothing is downloaded and no remote code runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llamatelemetry_engine.config import ModelConfig
from llamatelemetry_engine.errors import ModelLoadError
from llamatelemetry_engine.loader.weights import LoadedModel, check_state_dict

__all__ = ["load_hf_folder", "load_transformers_model"]


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"missing weight file {f}; the checkpoint folder is incomplete")
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"corrupt weight file {f}: {exc}; download it again") from exc
    return state


def load_tokenizer(folder: Path) -> Any:
    """The transformers tokenizer of ``folder``, or ``None`` without tokenizer files or transformers."""
    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


def load_hf_folder(path: str | Path) -> LoadedModel:
    """Read ``config.json``, the safetensors weights and the tokenizer of a checkpoint folder.

    Raises :class:`ModelLoadError` for a missing folder, config or weight file, a corrupt file, a pickled-only
    checkpoint, or weights that do not match the configuration; :class:`ConfigurationError` for an unsupported
    architecture.
    """
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder}: no config.json; expected a transformers checkpoint folder or a .gguf file")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"corrupt {config_file}: {exc}") from exc
    config = ModelConfig.from_hf(raw)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        files = [folder / s for s in shards]
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    elif any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise ModelLoadError(
            f"{folder} holds only pickled weights (.bin/.pt), which this engine never loads (unpickling runs "
            "code); convert them to safetensors first"
        )
    else:
        raise ModelLoadError(f"missing weight file {folder / 'model.safetensors'}")
    state = _read_safetensors(files)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    check_state_dict(config, state, str(folder))
    return LoadedModel(config, state, source=str(folder), tokenizer=load_tokenizer(folder))


def load_transformers_model(model: Any, tokenizer: Any = None) -> LoadedModel:
    """Take the configuration and weights of an in-memory transformers causal LM (weights are shared, not copied)."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(model, "state_dict"):
        raise ModelLoadError(f"expected a transformers PreTrainedModel, got {type(model).__name__}")
    config = ModelConfig.from_hf(hf_config.to_dict())
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    check_state_dict(config, state, type(model).__name__)
    return LoadedModel(config, state, source=f"in-memory {type(model).__name__}", tokenizer=tokenizer)
