from __future__ import annotations

import importlib.metadata

import llamatelemetry_kvcache


def test_installed_version_matches_the_package() -> None:
    assert llamatelemetry_kvcache.__version__ == importlib.metadata.version("llamatelemetry-kvcache")
