"""``llamatelemetry.inference.kv_cache`` re-exports the llamatelemetry-kvcache component, names and objects."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

import llamatelemetry_kvcache
from llamatelemetry._components import COMPONENTS, install_command


def test_guide_imports_are_the_components_objects() -> None:
    from llamatelemetry.inference.kv_cache import KVCache, KVCacheConfig, PagedKVCache

    assert KVCache is llamatelemetry_kvcache.KVCache
    assert KVCacheConfig is llamatelemetry_kvcache.KVCacheConfig
    assert PagedKVCache is llamatelemetry_kvcache.PagedKVCache


def test_all_matches_the_module_and_the_component() -> None:
    module = importlib.import_module("llamatelemetry.inference.kv_cache")
    public = {name for name in vars(module) if not name.startswith("_")} - {"missing_component"}
    assert set(module.__all__) == public
    assert len(module.__all__) == len(set(module.__all__))
    for name in module.__all__:
        assert getattr(module, name) is getattr(llamatelemetry_kvcache, name), name
        assert name in llamatelemetry_kvcache.__all__


def test_every_documented_name_is_exported() -> None:
    module = importlib.import_module("llamatelemetry.inference.kv_cache")
    assert set(COMPONENTS["kvcache"].documented_names) <= set(module.__all__)


def test_a_missing_component_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llamatelemetry_kvcache", None)
    monkeypatch.delitem(sys.modules, "llamatelemetry.inference.kv_cache", raising=False)
    with pytest.raises(ImportError, match=re.escape(install_command("kvcache"))):
        importlib.import_module("llamatelemetry.inference.kv_cache")
    monkeypatch.delitem(sys.modules, "llamatelemetry.inference.kv_cache", raising=False)
