"""``llamatelemetry.cuda.triton_kernels``: the guide's names, re-exported from llamatelemetry-triton."""

from __future__ import annotations

import pytest
import torch

import llamatelemetry.cuda.triton_kernels as documented
import llamatelemetry_triton
from llamatelemetry._components import COMPONENTS
from llamatelemetry_core.selection import record_selections


def test_every_documented_name_is_the_components_own_object() -> None:
    for name in COMPONENTS["triton"].documented_names:
        assert name in documented.__all__
    for name in documented.__all__:
        assert getattr(documented, name) is getattr(llamatelemetry_triton, name)


def test_guide_high_level_functions_run_on_any_device() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(4096, device=device)
    b = torch.randn(4096, device=device)
    assert torch.allclose(documented.triton_add(a, b), a + b)
    x = torch.randn(32, 768, device=device)
    weight = torch.ones(768, device=device)
    bias = torch.zeros(768, device=device)
    normed = documented.triton_layernorm(x, weight, bias, eps=1e-5)
    assert torch.allclose(normed, torch.nn.functional.layer_norm(x, (768,), weight, bias, 1e-5), atol=1e-5)
    logits = torch.randn(32, 1024, device=device)
    with record_selections() as rec:
        probs = documented.triton_softmax(logits)
    assert rec.last("softmax") in {"triton", "reference"}
    assert torch.allclose(probs, torch.softmax(logits, -1), atol=1e-6)


def test_list_kernels_names_the_builtins_where_triton_runs() -> None:
    names = documented.list_kernels()
    if not llamatelemetry_triton.HAS_TRITON:
        assert names == []
    elif names:
        assert {"add", "layernorm", "softmax"} <= set(names)
    with pytest.raises(KeyError, match="no kernel named"):
        documented.get_kernel("no_such_kernel")
