"""The shared benchmark helpers: slug, JSON schema, Markdown table, targets and exit status, host timing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.testing.bench import (
    SCHEMA,
    Report,
    Row,
    device_slug,
    gpu_ms,
    host_us,
    markdown_table,
)


def test_slug_names_the_machine_class() -> None:
    slug = device_slug(torch.device("cpu"))
    assert slug.startswith("cpu-") and slug == slug.lower() and " " not in slug and len(slug) > 4


def test_report_writes_one_schema_and_exits_1_on_a_missed_target(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = Report("demo")
    row = report.add(Row("copy", "ours", 2.0, "ms", baseline=3.0, baseline_name="torch"))
    assert row.ratio == pytest.approx(1.5)
    assert report.add(Row("bw", "ours", 800.0, "GB/s", baseline=1000.0)).ratio == pytest.approx(0.8)
    assert report.check("ours >= 0.95 of copy", 0.8, 0.95) is False
    assert report.check("host cost", 3.0, 5.0, at_most=True) is True
    assert report.finish(tmp_path) == 1
    data = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert set(data) == {"benchmark", "rows", "targets", "extra"}
    head = data["benchmark"]
    assert head["schema"] == SCHEMA and head["component"] == "demo" and head["device"] == device_slug()
    assert head["environment"]["versions"]["torch"] == torch.__version__
    assert [t["met"] for t in data["targets"]] == [False, True]
    out = capsys.readouterr()
    assert out.out.rstrip().endswith("missed targets: ours >= 0.95 of copy")
    assert "copy / ours: 2 ms" in out.err  # progress goes to stderr
    assert Report("ok").finish(tmp_path / "ok") == 0


def test_markdown_table_escapes_pipes() -> None:
    table = markdown_table(["a", "b"], [["x|y", "1"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


def test_host_us_times_a_call() -> None:
    assert 0 < host_us(lambda: None, calls=100, repeats=2) < 1e4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_gpu_timing_needs_a_gpu() -> None:
    with pytest.raises(ConfigurationError, match="needs a CUDA device"):
        gpu_ms(lambda: None)


@pytest.mark.gpu
def test_gpu_ms_times_a_kernel_and_a_graph_replay() -> None:
    x = torch.randn(1 << 20, device="cuda")
    assert gpu_ms(lambda: x.mul_(1.0), reps=5) > 0
    assert gpu_ms(lambda: x.mul_(1.0), reps=5, graph=True) > 0
