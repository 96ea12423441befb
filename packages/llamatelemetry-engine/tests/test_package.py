from __future__ import annotations

import importlib.metadata

import llamatelemetry_engine


def test_installed_version_matches_the_package() -> None:
    assert llamatelemetry_engine.__version__ == importlib.metadata.version("llamatelemetry-engine")


def test_public_names() -> None:
    for name in llamatelemetry_engine.__all__:
        assert hasattr(llamatelemetry_engine, name), name
