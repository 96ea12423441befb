"""The tested torch/Triton ranges and the check of installed versions against them."""

from __future__ import annotations

import importlib.metadata

import pytest

from llamatelemetry_core.toolchain import TESTED_RANGES, in_range, untested_versions, version_checks


@pytest.mark.parametrize(
    ("version", "specifier", "inside"),
    [
        ("2.13.0+cpu", ">=2.11,<2.16", True),
        ("2.11.0", ">=2.11,<2.16", True),
        ("2.10.1", ">=2.11,<2.16", False),
        ("2.16.0", ">=2.11,<2.16", False),
        ("2.15.9", ">=2.11,<2.16", True),
        ("3.9", ">=3.6,<3.10", True),
        ("3.10.0", ">=3.6,<3.10", False),
        ("3.5.1", ">=3.6,<3.10", False),
        ("3.6.0", "==3.6", True),
        ("3.6.1", "<=3.6,>3.5", False),
    ],
)
def test_in_range_compares_numeric_releases(version: str, specifier: str, inside: bool) -> None:
    assert in_range(version, specifier) is inside


@pytest.mark.parametrize(("version", "specifier"), [("2.13", "~=2.13"), ("latest", ">=2.11")])
def test_in_range_rejects_what_it_cannot_read(version: str, specifier: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        in_range(version, specifier)


def test_installed_versions_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = {"torch": "2.16.1", "triton": None}

    def version(package: str) -> str:
        found = installed[package]
        if found is None:
            raise importlib.metadata.PackageNotFoundError(package)
        return found

    monkeypatch.setattr(importlib.metadata, "version", version)
    checks = {c.package: c for c in version_checks()}
    assert checks["torch"].installed == "2.16.1" and not checks["torch"].ok
    assert checks["torch"].tested == TESTED_RANGES["torch"]
    assert checks["triton"].installed is None and checks["triton"].ok  # absent Triton: the fallbacks run
    assert [c.package for c in untested_versions()] == ["torch"]
