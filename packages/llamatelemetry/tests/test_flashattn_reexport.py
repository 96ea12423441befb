"""``llamatelemetry.inference.flash_attn`` re-exports the llamatelemetry-flashattn component, names and objects."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

import llamatelemetry_flashattn
from llamatelemetry._components import COMPONENTS, install_command


def test_guide_imports_are_the_components_objects() -> None:
    from llamatelemetry.inference.flash_attn import (
        FlashAttentionConfig,
        check_flash_attention_available,
        enable_flash_attention,
        flash_attention_forward,
        get_optimal_context_length,
    )

    assert FlashAttentionConfig is llamatelemetry_flashattn.FlashAttentionConfig
    assert check_flash_attention_available is llamatelemetry_flashattn.check_flash_attention_available
    assert enable_flash_attention is llamatelemetry_flashattn.enable_flash_attention
    assert flash_attention_forward is llamatelemetry_flashattn.flash_attention_forward
    assert get_optimal_context_length is llamatelemetry_flashattn.get_optimal_context_length


def test_all_matches_the_module_and_the_component() -> None:
    module = importlib.import_module("llamatelemetry.inference.flash_attn")
    public = {name for name in vars(module) if not name.startswith("_")} - {"missing_component"}
    assert set(module.__all__) == public
    assert len(module.__all__) == len(set(module.__all__))
    for name in module.__all__:
        assert getattr(module, name) is getattr(llamatelemetry_flashattn, name), name
        assert name in llamatelemetry_flashattn.__all__


def test_every_documented_name_is_exported() -> None:
    module = importlib.import_module("llamatelemetry.inference.flash_attn")
    documented = COMPONENTS["flashattn"].documented_names
    assert set(documented) <= set(module.__all__)
    assert "attention_backend_report" in module.__all__


def test_a_missing_component_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llamatelemetry_flashattn", None)
    monkeypatch.delitem(sys.modules, "llamatelemetry.inference.flash_attn", raising=False)
    with pytest.raises(ImportError, match=re.escape(install_command("flashattn"))):
        importlib.import_module("llamatelemetry.inference.flash_attn")
    monkeypatch.delitem(sys.modules, "llamatelemetry.inference.flash_attn", raising=False)
