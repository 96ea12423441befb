"""Shared fixtures of the llamatelemetry-engine tests: transformers reference models on the same weights.

Under Triton's interpreter (the cpu-triton matrices) a whole model through the Triton kernels takes seconds per
step, so there the kernels run only in the tests marked ``kernel_paths``: those whose subject is the path through
the kernels (every architecture, the few-row and small-M projections, the fused RoPE and paged write, chunked
prefill over cached prefixes, the fuzzed comparison with plain PyTorch). Every other engine test is about the
engine's own logic (scheduling, graphs, warm-up, flags, merged weights) and runs there with
``LLAMATELEMETRY_BACKEND=reference``, still with Triton installed, so that the engine takes the paths it takes
beside Triton. The kernels themselves are checked against their references in each component's tests, and on
a GPU every engine test runs them. ``LLAMATELEMETRY_BACKEND`` set by the caller is left as it is;
``LLAMATELEMETRY_ENGINE_TESTS=kernels`` runs every engine test through the kernels under the interpreter too.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator

import pytest
import torch

from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_core.selection import BACKEND_ENV, REFERENCE, reload_environment
from llamatelemetry_engine import LoadedModel, ModelConfig

ReferenceFactory = Callable[[LoadedModel], torch.nn.Module]
ALL_KERNELS_ENV = "LLAMATELEMETRY_ENGINE_TESTS"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kernel_paths: the test's subject is the path through the Triton kernels; under Triton's interpreter it "
        "runs them, where other engine tests run the PyTorch references (see the engine's tests/conftest.py)",
    )


@pytest.fixture(autouse=True)
def _references_under_the_interpreter(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under the interpreter, an engine test not marked ``kernel_paths`` runs every op's reference."""
    if (
        not triton_interpreter_enabled()
        or request.node.get_closest_marker("kernel_paths") is not None
        or os.environ.get(BACKEND_ENV, "").strip()
        or os.environ.get(ALL_KERNELS_ENV, "").strip() == "kernels"
    ):
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(BACKEND_ENV, REFERENCE)
        reload_environment()
        yield
    reload_environment()


@pytest.fixture
def rng() -> torch.Generator:
    """A generator with a fresh seed per test; the seed is printed, so a failing test shows it."""
    seed = secrets.randbits(31)
    print(f"rng seed: {seed}")
    return torch.Generator().manual_seed(seed)


def _hf_model(loaded: LoadedModel) -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    config: ModelConfig = loaded.config
    raw = config.to_hf()
    cls_name = raw.pop("architectures")[0]
    config_cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[raw.pop("model_type")]
    hf_config = config_cls(**raw)
    hf_config._attn_implementation = "sdpa"
    model = getattr(transformers, cls_name)(hf_config).eval()
    state = dict(loaded.state_dict)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model  # type: ignore[no-any-return]


@pytest.fixture
def hf_reference() -> ReferenceFactory:
    """Build the transformers model of a :class:`LoadedModel` (same weights, fp32, CPU)."""
    return _hf_model


def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy ``generate`` of ``new_tokens`` tokens, end-of-sequence ignored."""
    out = model.generate(  # type: ignore[operator]
        torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    return [int(t) for t in out[0, len(prompt) :].tolist()]


@pytest.fixture
def greedy() -> Callable[[torch.nn.Module, list[int], int], list[int]]:
    """transformers' greedy generation (see :func:`hf_greedy`)."""
    return hf_greedy
