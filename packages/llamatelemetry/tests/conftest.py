"""Fixtures of the meta-package's tests: the monorepo's scripts, loaded as modules."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """``load_script("install")``: ``scripts/install.py`` as a module; skips outside a monorepo checkout."""
    loaded: dict[str, ModuleType] = {}

    def load(name: str) -> ModuleType:
        if name not in loaded:
            path = ROOT / "scripts" / f"{name}.py"
            if not path.is_file():
                pytest.skip(f"needs the monorepo checkout (scripts/{name}.py)")
            spec = importlib.util.spec_from_file_location(f"scripts_{name}", path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]

    return load
