"""The torch and Triton versions llamatelemetry is tested with, and whether the installed ones are among them.

:data:`TESTED_RANGES` is the one statement of those ranges: every distribution declares exactly these
requirements (a repository test checks it), and the test matrices cover both ends:

* the oldest pair, torch 2.11 with Triton 3.6, on the GPU machine (the ``gpu`` matrix);
* the pinned CPU matrices, torch 2.13 with Triton 3.6;
* the ``latest`` CPU matrix and the ``t4-latest`` ahead-of-time check with the newest Triton the package index
  serves (3.9 when these ranges were set; torch 2.15's Linux wheels require it, as torch 2.14's require 3.8).

The upper bounds sit one minor release past the newest tested; widening them means running the latest matrix
with the new release first. :func:`untested_versions` says which installed versions lie outside (``llamatelemetry
doctor`` reports them); nothing refuses to run on them.
"""

from __future__ import annotations

import importlib.metadata
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TESTED_RANGES", "TRITON_INSTALL", "VersionCheck", "in_range", "untested_versions", "version_checks"]

TESTED_RANGES: dict[str, str] = {"torch": ">=2.11,<2.16", "triton": ">=3.6,<3.10"}
TRITON_INSTALL = f'pip install "triton{TESTED_RANGES["triton"]}"'
"""The command every "Triton is missing" message names: a Triton within the tested range (an unbounded
``pip install triton`` takes the newest release, which may not compile the kernels)."""

_OPERATORS: dict[str, Callable[[tuple[int, ...], tuple[int, ...]], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}


@dataclass(frozen=True)
class VersionCheck:
    """One package: the installed version (``None``: not installed), the tested range, and whether it is inside."""

    package: str
    installed: str | None
    tested: str
    ok: bool


def _release(version: str) -> tuple[int, ...]:
    """The numeric release of a version: ``"2.13.0+cpu"`` -> ``(2, 13, 0)``, ``"3.9"`` -> ``(3, 9, 0)``."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    if match is None:
        raise ValueError(f"expected a version like 2.13.0, got {version!r}")
    parts = tuple(int(p) for p in match.group(0).split("."))
    return (*parts, 0, 0, 0)[:3]


def in_range(version: str, specifier: str) -> bool:
    """Whether ``version`` satisfies ``specifier`` (comma-separated clauses such as ``>=2.11,<2.16``).

    Only the numeric release is compared (local tags such as ``+cpu`` are ignored), which is all the ranges of
    :data:`TESTED_RANGES` need.
    """
    release = _release(version)
    for clause in specifier.split(","):
        match = re.fullmatch(r"\s*(>=|<=|==|>|<)\s*([\d.]+)\s*", clause)
        if match is None:
            raise ValueError(f"expected clauses like '>=2.11' or '<2.16', got {clause!r} in {specifier!r}")
        if not _OPERATORS[match.group(1)](release, _release(match.group(2))):
            return False
    return True


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_checks() -> list[VersionCheck]:
    """torch and Triton: what is installed, the tested range, and whether it is inside (absent Triton is fine)."""
    checks = []
    for package, tested in TESTED_RANGES.items():
        installed = _installed(package)
        checks.append(VersionCheck(package, installed, tested, installed is None or in_range(installed, tested)))
    return checks


def untested_versions() -> list[VersionCheck]:
    """The installed packages of :func:`version_checks` whose version lies outside the tested range."""
    return [check for check in version_checks() if not check.ok]
