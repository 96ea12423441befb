"""What every benchmark shares (``benchmarks/conftest.py``): ``--device-baseline`` finds the newest stored baseline
of the machine, compares a run with it and fails on a regression, and without one stores the run as the baseline;
the GPU suites' checks refuse a result out of tolerance and a call that ran the PyTorch fallback."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[3]
CONFTEST = ROOT / "benchmarks" / "conftest.py"

pytest.importorskip("pytest_benchmark")


@pytest.fixture(scope="module")
def conftest() -> ModuleType:
    if not CONFTEST.is_file():
        pytest.skip("needs the monorepo checkout (benchmarks/conftest.py)")
    spec = importlib.util.spec_from_file_location("benchmarks_conftest", CONFTEST)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _machine_id() -> str:
    from pytest_benchmark.utils import get_machine_id

    machine_id: str = get_machine_id()  # type: ignore[no-untyped-call]
    return machine_id


def test_the_newest_baseline_of_the_machine_is_found(conftest: ModuleType, tmp_path: Path) -> None:
    assert conftest.find_baseline(tmp_path, "Linux-CPython-3.12-64bit") is None  # no folder
    folder = tmp_path / "Linux-CPython-3.12-64bit"
    folder.mkdir()
    for name in ("0001_baseline.json", "0003_baseline-torch2.11.json", "0002_baseline.json", "0004_abc_20261130.json"):
        (folder / name).write_text("{}")
    (tmp_path / "Linux-CPython-3.11-64bit").mkdir()
    (tmp_path / "Linux-CPython-3.11-64bit" / "0009_baseline.json").write_text("{}")  # another machine
    assert conftest.find_baseline(tmp_path, "Linux-CPython-3.12-64bit") == folder / "0003_baseline-torch2.11.json"
    (folder / "0003_baseline-torch2.11.json").unlink()
    assert conftest.find_baseline(tmp_path, "Linux-CPython-3.12-64bit") == folder / "0002_baseline.json"
    for name in ("0001_baseline.json", "0002_baseline.json"):
        (folder / name).unlink()
    assert conftest.find_baseline(tmp_path, "Linux-CPython-3.12-64bit") is None  # an autosaved run is no baseline


def test_storage_path(conftest: ModuleType) -> None:
    assert conftest.storage_path("file:///tmp/results") == Path("/tmp/results")
    assert conftest.storage_path("results/here") == Path("results/here")
    assert conftest.storage_path("elasticsearch+http://host:9200/index") is None


SLEEPER = """
import os, time

def test_sleep(benchmark):
    benchmark.pedantic(time.sleep, args=(float(os.environ["BENCH_SLEEP"]),), rounds=3, warmup_rounds=1)
"""


@pytest.fixture
def bench_project(pytester: pytest.Pytester) -> pytest.Pytester:
    if not CONFTEST.is_file():
        pytest.skip("needs the monorepo checkout (benchmarks/conftest.py)")
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))
    pytester.makepyfile(test_bench_sleep=SLEEPER)
    return pytester


def _run(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, sleep: float, *args: str, subprocess: bool = False
) -> pytest.RunResult:
    monkeypatch.setenv("BENCH_SLEEP", str(sleep))
    # The inner run is a plain pytest run even when this test runs on a pytest-xdist worker (the CPU matrices):
    # pytest-benchmark takes the worker's variable as its own and would time nothing and save nothing.
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    options = ("-p", "no:cacheprovider", f"--benchmark-storage=file://{project.path / 'store'}", *args)
    # pytest-benchmark reports a regression by raising from the terminal summary: a separate process, as on the
    # command line, where it ends the run with a non-zero status.
    return project.runpytest_subprocess(*options) if subprocess else project.runpytest(*options)


def test_without_a_baseline_the_run_becomes_one_then_a_regression_fails(
    bench_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = bench_project.path / "store" / _machine_id()
    first = _run(bench_project, monkeypatch, 0.002, "--device-baseline=median:100%")
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(
        ["device baseline: no stored baseline for *: not compared; this run is saved as baseline"]
    )
    assert sorted(p.name for p in stored.iterdir()) == ["0001_baseline.json"]

    same = _run(bench_project, monkeypatch, 0.002, "--device-baseline=median:100%")
    assert same.ret == 0
    same.stdout.fnmatch_lines(
        ["device baseline: compared with *0001_baseline.json; a benchmark fails beyond median:100%"]
    )

    # 25x the baseline's median
    slower = _run(bench_project, monkeypatch, 0.05, "--device-baseline=median:100%", subprocess=True)
    assert slower.ret != 0
    assert "Performance has regressed" in slower.stdout.str() + slower.stderr.str()
    assert sorted(p.name for p in stored.iterdir()) == ["0001_baseline.json"]  # comparisons store nothing


def test_saving_a_new_baseline_is_not_compared(bench_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = bench_project.path / "store" / _machine_id()
    assert _run(bench_project, monkeypatch, 0.002, "--benchmark-save=baseline").ret == 0
    slower = _run(bench_project, monkeypatch, 0.05, "--device-baseline=median:100%", "--benchmark-save=baseline")
    assert slower.ret == 0
    slower.stdout.fnmatch_lines(["device baseline: saving a new baseline (baseline) under *: not compared"])
    assert sorted(p.name for p in stored.iterdir()) == ["0001_baseline.json", "0002_baseline.json"]
    # The newest baseline is now the slow one: the same speed passes.
    assert _run(bench_project, monkeypatch, 0.05, "--device-baseline=median:100%").ret == 0


def test_a_bad_expression_or_two_comparisons_are_refused(
    bench_project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = _run(bench_project, monkeypatch, 0.001, "--device-baseline=median:fast")
    assert bad.ret != 0
    bad.stderr.fnmatch_lines(["*Could not parse value*"])
    assert _run(bench_project, monkeypatch, 0.001, "--benchmark-save=baseline").ret == 0
    both = _run(bench_project, monkeypatch, 0.001, "--device-baseline=median:100%", "--benchmark-compare")
    assert both.ret != 0
    both.stderr.fnmatch_lines(["*give --device-baseline or --benchmark-compare, not both*"])


def test_check_close_passes_within_the_tolerance_and_shows_where_it_fails(conftest: ModuleType) -> None:
    import torch

    expected = torch.linspace(-4, 4, 64).to(torch.float16)
    conftest.check_close(expected + 1e-3, expected, name="within")  # fp16 table: atol 2e-3
    with pytest.raises(AssertionError, match=r"(?s)off by one: 1 of 64 elements differ .*largest error at \[5\]"):
        conftest.check_close(expected.clone().index_fill_(0, torch.tensor([5]), 9.0), expected, name="off by one")
    conftest.check_close(expected + 6e-3, expected, name="scaled", scale=4.0)
    with pytest.raises(AssertionError, match="scaled"):
        conftest.check_close(expected + 6e-3, expected, name="scaled")


def test_run_recorded_names_the_implementations_and_refuses_the_reference(conftest: ModuleType) -> None:
    import torch

    from llamatelemetry_core.selection import Operation

    x = torch.ones(3)
    fast = Operation("bench_test.fast", lambda t: t + 1, replace=True)
    fast.register("native", lambda t: t + 1, priority=1, devices={"cpu", "cuda"})
    result, chosen = conftest.run_recorded(lambda: fast.run((x,), x))
    assert torch.equal(result, x + 1) and chosen == {"bench_test.fast": "native"}
    only_reference = Operation("bench_test.slow", lambda t: t * 2, replace=True)
    with pytest.raises(AssertionError, match=r"bench_test\.slow ran the PyTorch reference"):
        conftest.run_recorded(lambda: (fast.run((x,), x), only_reference.run((x,), x)))
