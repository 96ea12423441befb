"""The host-cost regression check of CI (``scripts/check_host_overhead.py``): machine speed cancels out, a grown
overhead factor fails, a group that was not measured fails, and the best of several runs is what counts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


@pytest.fixture(scope="module")
def check(load_script: Callable[[str], ModuleType]) -> ModuleType:
    return load_script("check_host_overhead")


def _report(pairs: dict[str, tuple[float, float]], speed: float = 1.0) -> dict[str, Any]:
    """pytest-benchmark JSON with (native, ours) fastest rounds per group, every time scaled by ``speed``."""
    benchmarks = []
    for group, (native, ours) in pairs.items():
        for side, seconds in (("native", native), ("ours", ours)):
            benchmarks.append(
                {"name": f"test_host_cost[{side}-{group}]", "group": group, "stats": {"min": seconds * speed}}
            )
    return {"benchmarks": benchmarks}


BASE = {"rmsnorm": (10e-6, 25e-6), "add": (1e-6, 8e-6)}


def test_a_slower_machine_is_not_a_regression(check: ModuleType) -> None:
    lines, failures = check.compare(_report(BASE), [_report(BASE, speed=2.5)])
    assert failures == []
    assert any(line.split()[0] == "rmsnorm" and line.split()[-1] == "1.00x" for line in lines)


def test_a_grown_factor_fails_and_names_the_group(check: ModuleType) -> None:
    slower_ours = {"rmsnorm": (10e-6, 40e-6), "add": (1e-6, 8e-6)}  # 2.5x -> 4.0x: 1.6x growth
    _, failures = check.compare(_report(BASE), [_report(slower_ours)], limit=1.5)
    assert len(failures) == 1 and failures[0].startswith("rmsnorm:") and "1.60x growth" in failures[0]
    _, failures = check.compare(_report(BASE), [_report(slower_ours)], limit=1.7)
    assert failures == []


def test_the_best_of_several_runs_counts(check: ModuleType) -> None:
    noisy = {"rmsnorm": (10e-6, 60e-6), "add": (1e-6, 8e-6)}
    _, failures = check.compare(_report(BASE), [_report(noisy), _report(BASE, speed=1.3)])
    assert failures == []
    _, failures = check.compare(_report(BASE), [_report(noisy), _report(noisy)])
    assert [f.split(":")[0] for f in failures] == ["rmsnorm"]


def test_a_group_that_was_not_measured_fails(check: ModuleType) -> None:
    _, failures = check.compare(_report(BASE), [_report({"add": BASE["add"]})])
    assert failures == ["rmsnorm: in the baseline but not measured in this run"]
    lines, failures = check.compare(_report({"add": BASE["add"]}), [_report(BASE)])
    assert failures == [] and any(line.split()[0] == "rmsnorm" and line.endswith("new") for line in lines)


def test_bad_arguments_are_refused(check: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"limit must be above 1\.0"):
        check.compare(_report(BASE), [_report(BASE)], limit=1.0)
    with pytest.raises(ValueError, match="no current run"):
        check.compare(_report(BASE), [])
    base = tmp_path / "base.json"
    base.write_text(json.dumps(_report(BASE)))
    with pytest.raises(SystemExit):
        check.main([str(base), str(tmp_path / "missing.json")])
    assert "cannot read" in capsys.readouterr().err
    grown = tmp_path / "grown.json"
    grown.write_text(json.dumps(_report({"rmsnorm": (10e-6, 40e-6), "add": (1e-6, 8e-6)})))
    assert check.main([str(base), str(grown)]) == 1
    assert "host-cost regression" in capsys.readouterr().out
    assert check.main([str(base), str(base)]) == 0
