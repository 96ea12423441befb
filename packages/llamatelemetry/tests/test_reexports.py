"""The documented import paths: re-exports of installed components, and clear errors for missing ones."""

from __future__ import annotations

import importlib
import sys

import pytest

from llamatelemetry._components import COMPONENTS, import_component, missing_component
from llamatelemetry_core.errors import CapabilityError

EXTRAS = sorted(COMPONENTS)


def _fresh_import(path: str) -> object:
    sys.modules.pop(path, None)
    return importlib.import_module(path)


@pytest.mark.parametrize("extra", EXTRAS)
def test_documented_path_exposes_every_documented_name(extra: str) -> None:
    component = COMPONENTS[extra]
    module = importlib.import_module(component.documented_path)
    backing = import_component(extra)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list)
    for name in exported:
        assert getattr(module, name) is getattr(backing, name), f"{name} is not the component's own object"
    for name in component.documented_names:
        if name in exported:
            continue
        # A documented name the installed component does not provide yet fails loudly, never silently.
        with pytest.raises(CapabilityError, match=rf"{component.documented_path}\.{name} is documented but"):
            getattr(module, name)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


@pytest.mark.parametrize("extra", EXTRAS)
def test_missing_component_names_the_extra(extra: str, monkeypatch: pytest.MonkeyPatch) -> None:
    component = COMPONENTS[extra]
    monkeypatch.setitem(sys.modules, component.import_name, None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, component.documented_path, raising=False)
    with pytest.raises(ImportError) as exc:
        importlib.import_module(component.documented_path)
    message = str(exc.value)
    assert f'pip install "llamatelemetry[{extra}]"' in message
    assert component.distribution in message
    monkeypatch.delitem(sys.modules, component.documented_path, raising=False)


def test_a_broken_dependency_is_not_reported_as_a_missing_extra() -> None:
    cause = ModuleNotFoundError("No module named 'torch'", name="torch")
    assert missing_component("graphs", cause) is cause
    inner = ModuleNotFoundError("No module named 'llamatelemetry_graphs.graph'", name="llamatelemetry_graphs.graph")
    assert "llamatelemetry[graphs]" in str(missing_component("graphs", inner))


def test_extras_and_components_agree() -> None:
    assert set(EXTRAS) == {"graphs", "triton", "tensorcore", "flashattn", "kvcache", "batch", "engine"}
    paths = {c.documented_path for c in COMPONENTS.values()}
    assert paths == {
        "llamatelemetry.cuda.graphs",
        "llamatelemetry.cuda.triton_kernels",
        "llamatelemetry.cuda.tensor_core",
        "llamatelemetry.inference.flash_attn",
        "llamatelemetry.inference.kv_cache",
        "llamatelemetry.inference.batch",
        "llamatelemetry.engine",
    }


def test_top_level_import_is_light() -> None:
    for name in [m for m in sys.modules if m.startswith("llamatelemetry.")]:
        sys.modules.pop(name)
    _fresh_import("llamatelemetry")
    assert not any(m.startswith(("llamatelemetry.cuda.", "llamatelemetry.inference.")) for m in sys.modules)
    assert "llamatelemetry.engine" not in sys.modules
