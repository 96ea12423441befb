"""The documented import paths: re-exports of installed components, and clear errors for missing ones."""

from __future__ import annotations

import dataclasses
import importlib
import sys

import pytest

from llamatelemetry._components import (
    COMPONENTS,
    NotYetProvidedError,
    import_component,
    install_command,
    missing_component,
    not_yet_provided,
    source_checkout,
)
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
        # A documented name the installed component does not provide yet fails loudly, never silently, and
        # as an AttributeError, so that hasattr and getattr with a default keep working.
        with pytest.raises(AttributeError, match=rf"{component.documented_path}\.{name} is documented") as exc:
            getattr(module, name)
        assert isinstance(exc.value, NotYetProvidedError) and isinstance(exc.value, CapabilityError)
        assert exc.value.name == name and exc.value.obj is module
        assert "upgrade" not in str(exc.value) and "not implemented yet" in str(exc.value)
        assert not hasattr(module, name)
        assert getattr(module, name, None) is None
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
    assert install_command(extra) in message
    assert component.distribution in message
    monkeypatch.delitem(sys.modules, component.documented_path, raising=False)


def test_a_broken_dependency_is_not_reported_as_a_missing_extra() -> None:
    cause = ModuleNotFoundError("No module named 'torch'", name="torch")
    assert missing_component("graphs", cause) is cause
    inner = ModuleNotFoundError("No module named 'llamatelemetry_graphs.graph'", name="llamatelemetry_graphs.graph")
    assert install_command("graphs") in str(missing_component("graphs", inner))


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


def test_the_install_hint_fits_the_kind_of_install(monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests run from a clone (editable or in place): the hint is the clone's install script.
    checkout = source_checkout()
    assert checkout is not None and (checkout / "scripts" / "install.py").is_file()
    assert install_command("triton") == f"python {checkout / 'scripts' / 'install.py'} triton"
    # An install from a package index has no clone to point at: pip with the extra.
    # (Patched through the function's own globals: another test re-imports the module.)
    monkeypatch.setitem(install_command.__globals__, "source_checkout", lambda: None)
    assert install_command("triton") == 'pip install "llamatelemetry[triton]"'
    assert COMPONENTS["kvcache"].install == 'pip install "llamatelemetry[kvcache]"'


def test_a_documented_name_not_provided_yet_is_an_honest_attribute_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every documented name is provided today; the mechanism stays for the guide's future names. A module whose
    # __getattr__ answers with not_yet_provided keeps hasattr, getattr's default and dir() working.
    component = COMPONENTS["batch"]
    later = dataclasses.replace(component, documented_names=(*component.documented_names, "Later"))
    monkeypatch.setitem(COMPONENTS, "batch", later)
    module = importlib.import_module(component.documented_path)

    def module_getattr(name: str) -> object:
        raise not_yet_provided("batch", name)

    monkeypatch.setattr(module, "__getattr__", module_getattr, raising=False)
    assert not hasattr(module, "Later")
    assert getattr(module, "Later", 7) == 7
    assert "BatchConfig" in dir(module)
    with pytest.raises(NotYetProvidedError) as caught:
        module.Later  # noqa: B018
    assert caught.value.name == "Later" and caught.value.obj is module
    error: BaseException = caught.value
    assert isinstance(error, AttributeError)
    assert isinstance(error, CapabilityError)
    message = str(error)
    assert message.startswith(f"{component.documented_path}.Later is documented in the user guide but not implemented")
    assert "upgrade" not in message and "pip install" not in message
    # A name the guide does not document is a plain AttributeError, not a promise.
    with pytest.raises(AttributeError) as plain:
        module.Never  # noqa: B018
    assert not isinstance(plain.value, NotYetProvidedError)
