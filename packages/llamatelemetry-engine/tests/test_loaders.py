"""Loaders: checkpoint folders, in-memory transformers models, and bad input that must be refused clearly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_engine import LLM, PRESETS, ModelLoadError, SamplingParams, load_model, random_weights
from llamatelemetry_engine.loader import LoadedModel

TINY = PRESETS["tiny"]
PROMPT = [4, 8, 15, 16, 23, 42]


def _save_folder(loaded: LoadedModel, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(loaded.config.to_hf()), encoding="utf-8")
    save_file({k: v.contiguous() for k, v in loaded.state_dict.items()}, str(folder / "model.safetensors"))


def test_checkpoint_folder_round_trip(tmp_path: Path) -> None:
    loaded = random_weights(TINY, seed=2)
    _save_folder(loaded, tmp_path / "ckpt")
    again = load_model(tmp_path / "ckpt")
    assert again.config == loaded.config
    for name, tensor in loaded.state_dict.items():
        assert torch.equal(again.state_dict[name], tensor), name


def test_in_memory_transformers_model_gives_its_tokens(
    hf_reference: Callable[[LoadedModel], torch.nn.Module],
    greedy: Callable[[torch.nn.Module, list[int], int], list[int]],
) -> None:
    hf = hf_reference(random_weights(TINY.with_overrides(tie_word_embeddings=True), seed=4))
    llm = LLM(hf, device="cpu")
    got = llm.generate([PROMPT], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    assert got == greedy(hf, PROMPT, 6)


def test_unsupported_architecture_in_a_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}), encoding="utf-8"
    )
    with pytest.raises(ConfigurationError, match="unsupported architecture 'GPT2LMHeadModel'"):
        load_model(tmp_path)


def test_missing_weight_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="missing weight file"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="missing weight file"):
        load_model(tmp_path / "model.gguf")


def test_pickled_checkpoints_are_never_loaded(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf()), encoding="utf-8")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ModelLoadError, match="never loads"):
        load_model(tmp_path)


def test_corrupt_weight_files(tmp_path: Path) -> None:
    loaded = random_weights(TINY, seed=2)
    _save_folder(loaded, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="corrupt weight file"):
        load_model(tmp_path)
    pytest.importorskip("gguf")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\x00" * 13)
    with pytest.raises(ModelLoadError, match="corrupt GGUF file"):
        load_model(tmp_path / "broken.gguf")


def test_weights_of_the_wrong_shape(tmp_path: Path) -> None:
    loaded = random_weights(TINY, seed=2)
    bigger = random_weights(TINY.with_overrides(intermediate_size=192), seed=2)
    _save_folder(LoadedModel(loaded.config, bigger.state_dict, "x"), tmp_path)
    with pytest.raises(ModelLoadError, match=r"mlp\.gate_proj\.weight has shape"):
        load_model(tmp_path)


def test_unknown_sources() -> None:
    with pytest.raises(ModelLoadError, match="unknown preset"):
        load_model("random:gpt5")
    with pytest.raises(ModelLoadError, match="no model at"):
        load_model("/nonexistent/model")
