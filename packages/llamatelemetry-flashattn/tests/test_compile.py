"""torch.compile: attention traces without a graph break, alone and inside a patched transformers Llama, and
``attn_implementation="llamatelemetry"`` needs no call beyond importing the component."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llamatelemetry_core.selection import BACKEND_ENV, reload_environment
from llamatelemetry_core.testing import assert_close
from llamatelemetry_flashattn import enable_flash_attention, flash_attention_forward


@pytest.fixture(autouse=True)
def _fresh_graphs() -> None:
    torch._dynamo.reset()


@pytest.mark.parametrize(
    ("causal", "kv_heads", "window", "softcap"),
    [(True, 4, None, None), (False, 2, None, None), (True, 1, (3, 0), None), (True, 4, None, 5.0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fullgraph_attention_matches_eager(
    causal: bool, kv_heads: int, window: tuple[int, int] | None, softcap: float | None, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 5, 4, 16, generator=gen).to(dtype)
    k, v = (torch.randn(2, 7, kv_heads, 16, generator=gen).to(dtype) for _ in range(2))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return flash_attention_forward(q, k, v, causal=causal, window_size=window, softcap=softcap)

    compiled = torch.compile(attend, fullgraph=True, backend="eager")
    assert_close(compiled(q, k, v), attend(q, k, v), name="compiled attention", dtype=dtype)


def test_the_backend_variable_is_honoured_under_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randn(1, 4, 2, 8)
    monkeypatch.setenv(BACKEND_ENV, "flash_attention=sdpa_cudnn")  # a GPU-only implementation, on a CPU tensor
    reload_environment()
    compiled = torch.compile(lambda t: flash_attention_forward(t, t, t), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="sdpa_cudnn"):
        compiled(q)
    monkeypatch.setenv(BACKEND_ENV, "flash_attention=reference")
    reload_environment()
    torch._dynamo.reset()
    assert_close(compiled(q), flash_attention_forward(q, q, q, backend="reference"), name="forced reference")


def _tiny_llama() -> tuple[torch.nn.Module, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 64, (1, 9))


def test_a_patched_llama_compiles_with_no_graph_break() -> None:
    model, ids = _tiny_llama()
    with torch.no_grad():
        expected = model(ids).logits
        enable_flash_attention(model)
        explained = torch._dynamo.explain(model)(ids)
        assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        assert_close(compiled(ids).logits, expected, name="compiled patched Llama", dtype=torch.float32)


def test_a_patched_llama_with_padding_compiles_with_no_graph_break() -> None:
    # A padded batch gives the attention an explicit mask, whose values a traced graph cannot read: under
    # torch.compile it goes to SDPA with that mask, and the real tokens get the eager logits.
    model, _ = _tiny_llama()
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        enable_flash_attention(model)
        expected = model(ids, attention_mask=mask).logits
        explained = torch._dynamo.explain(model)(ids, attention_mask=mask)
        assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        got = compiled(ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(got[real], expected[real], name="compiled padded Llama", dtype=torch.float32)


_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    if sys.argv[1] == "transformers-first":
        import transformers.modeling_utils
        import llamatelemetry_flashattn
    else:
        import llamatelemetry_flashattn
        assert "transformers.modeling_utils" not in sys.modules
    from transformers import LlamaConfig, LlamaForCausalLM
    from llamatelemetry_core.selection import record_selections
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM._from_config(config, attn_implementation="llamatelemetry").eval()
    with torch.no_grad(), record_selections() as record:
        model(torch.randint(0, 64, (1, 5)))
    print(model.config._attn_implementation, len(record.implementations("flash_attention")))
    """
)


@pytest.mark.parametrize("order", ["transformers-first", "component-first"])
def test_attn_implementation_works_after_importing_the_component(order: str) -> None:
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, order], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["llamatelemetry", "1"], done.stdout


_HOOK_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys, warnings
    import llamatelemetry_flashattn.patching as patching
    assert importlib.util.find_spec("transformers.modeling_utils") is not None  # a probe imports nothing
    assert "transformers.modeling_utils" not in sys.modules
    def broken():
        raise TypeError("an AttentionInterface from the future")
    patching._register_with_transformers = broken
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import transformers.modeling_utils
    print([str(w.message)[:60] for w in caught if w.category is RuntimeWarning])
    """
)


def test_a_failing_registration_warns_and_never_breaks_importing_transformers() -> None:
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", _HOOK_SCRIPT], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "llamatelemetry could not register" in done.stdout, done.stdout


def test_compiled_decode_over_a_growing_context_does_not_recompile_per_length() -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    q = torch.randn(1, 1, 4, 16)
    compiled = torch.compile(
        lambda q, k: flash_attention_forward(q, k, k, causal=True), fullgraph=True, backend="eager"
    )
    for length in range(5, 17):
        k = torch.randn(1, length, 2, 16)
        assert_close(compiled(q, k), flash_attention_forward(q, k, k, causal=True), name=f"context {length}")
    assert counters["stats"]["unique_graphs"] <= 2, "a graph per context length"  # static, then dynamic
