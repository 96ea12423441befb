from __future__ import annotations

import importlib.metadata

import llamatelemetry_triton


def test_installed_version_matches_the_package() -> None:
    assert llamatelemetry_triton.__version__ == importlib.metadata.version("llamatelemetry-triton")
