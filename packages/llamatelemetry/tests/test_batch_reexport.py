"""``llamatelemetry.inference.batch`` re-exports the llamatelemetry-batch component, names and objects."""

from __future__ import annotations

import importlib
import re
import sys

import pytest

import llamatelemetry_batch
from llamatelemetry._components import COMPONENTS, install_command


def test_guide_imports_are_the_components_objects() -> None:
    from llamatelemetry.inference.batch import BatchConfig, BatchInferenceOptimizer, batch_inference_optimized

    assert BatchConfig is llamatelemetry_batch.BatchConfig
    assert BatchInferenceOptimizer is llamatelemetry_batch.BatchInferenceOptimizer
    assert batch_inference_optimized is llamatelemetry_batch.batch_inference_optimized


def test_all_matches_the_module_and_the_component() -> None:
    module = importlib.import_module("llamatelemetry.inference.batch")
    public = {name for name in vars(module) if not name.startswith("_")} - {"missing_component"}
    assert set(module.__all__) == public
    assert len(module.__all__) == len(set(module.__all__))
    for name in module.__all__:
        assert getattr(module, name) is getattr(llamatelemetry_batch, name), name
        assert name in llamatelemetry_batch.__all__


def test_every_documented_name_is_exported() -> None:
    module = importlib.import_module("llamatelemetry.inference.batch")
    assert set(COMPONENTS["batch"].documented_names) <= set(module.__all__)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_a_missing_component_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llamatelemetry_batch", None)
    monkeypatch.delitem(sys.modules, "llamatelemetry.inference.batch", raising=False)
    with pytest.raises(ImportError, match=re.escape(install_command("batch"))):
        importlib.import_module("llamatelemetry.inference.batch")
    monkeypatch.delitem(sys.modules, "llamatelemetry.inference.batch", raising=False)
