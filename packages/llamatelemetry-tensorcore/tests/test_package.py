from __future__ import annotations

import importlib.metadata

import llamatelemetry_tensorcore


def test_installed_version_matches_the_package() -> None:
    assert llamatelemetry_tensorcore.__version__ == importlib.metadata.version("llamatelemetry-tensorcore")
