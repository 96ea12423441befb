"""``run_bench`` on a CPU: the rows that can run are measured, the others say what they need."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llamatelemetry_engine.bench import CLAIMS, format_table, plot_report, run_bench

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="timing loops under Triton's interpreter take minutes; the cpu-fallback matrix runs them",
)


@pytest.fixture(scope="module")
def report() -> dict[str, object]:
    return run_bench("random:tiny", device="cpu", quick=True, progress=False)


def test_every_row_is_measured_or_says_why_not(report: dict[str, object]) -> None:
    rows = report["rows"]
    assert isinstance(rows, list)
    assert [r["name"] for r in rows] == list(CLAIMS)
    by_name = {r["name"]: r for r in rows}
    for name in ("cuda_graphs", "tensor_cores", "triton_kernels"):
        assert by_name[name]["status"] == "skipped" and "GPU" in by_name[name]["reason"]
    for name in ("flash_attention", "engine"):
        row = by_name[name]
        assert row["status"] == "measured", row
        assert row["baseline"] > 0 and row["optimized"] > 0 and row["gain"] > 0
        assert row["claimed"] == CLAIMS[name]


def test_table_and_plot(report: dict[str, object], tmp_path: Path) -> None:
    table = format_table(report)
    assert "FlashAttention" in table and "skipped: needs a CUDA GPU" in table
    pytest.importorskip("matplotlib")
    plot_report(report, str(tmp_path / "gains.png"))
    assert (tmp_path / "gains.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "gains.png").stat().st_size > 1000


def test_plot_shows_a_loss_as_well_as_gains(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = [
        {"title": title, "status": "measured", "gain": gain}
        for title, gain in (("faster", 36.0), ("slower", 0.5), ("barely", 1.05))
    ]
    rows.append({"title": "needs a GPU", "status": "skipped"})
    plot_report({"device": "test", "rows": rows}, str(tmp_path / "gains.png"))
    assert (tmp_path / "gains.png").stat().st_size > 1000


def test_timing_warms_up_then_takes_the_median(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import torch

    from llamatelemetry_engine import bench

    # A clock that each call advances by its cost: the figures are exact, whatever the machine's load.
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])  # the module bench reads it from
    costs = iter([9.0, 9.0, 0.01, 0.05, 0.01, 0.05])  # two slow warm-ups (a compilation lands there), four runs
    calls: list[float] = []

    def fn() -> None:
        calls.append(next(costs))
        now[0] += calls[-1]

    seconds = bench._timed(torch.device("cpu"), fn, 4, warmups=2)
    assert len(calls) == 6
    assert seconds == pytest.approx(0.03)  # the median of the four timed runs, not the upper middle one (0.05)
    assert bench.GPU_WARMUPS >= 2  # the prefix cache's second pass compiles its own shapes before timing
