"""The shared benchmark helpers: slug, JSON schema, Markdown table, targets and exit status, host timing, and the
GPU timing helpers' argument checks and errors (their measurements run on a GPU only)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.testing.bench import (
    SCHEMA,
    CapturedPair,
    Report,
    Row,
    capture_for_timing,
    copy_gbps,
    device_slug,
    do_bench_ms,
    gpu_ms,
    host_us,
    markdown_table,
    warm_gpu,
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


class Calls:
    """A callable that counts its calls: the checks below must refuse before running anything."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def _pair(fn: Callable[[], object], launches: int, moved_bytes: int = 0, flops: int = 0) -> CapturedPair:
    return CapturedPair.capture("group", fn, fn, launches=launches, moved_bytes=moved_bytes, flops=flops)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda fn: capture_for_timing(fn, 0), "launches to be a positive integer, got 0"),
        (lambda fn: capture_for_timing(fn, True), "launches to be a positive integer, got True"),
        (lambda fn: capture_for_timing(fn, 2.0), "launches to be a positive integer, got 2.0"),  # type: ignore[arg-type]
        (lambda fn: capture_for_timing(fn, warmup=-1), "warmup to be an integer >= 0, got -1"),
        (lambda fn: gpu_ms(fn, reps=0), "reps to be a positive integer, got 0"),
        (lambda fn: gpu_ms(fn, graph=True, warmup=-2), "warmup to be an integer >= 0, got -2"),
        (lambda fn: do_bench_ms(fn, rep_ms=0), "rep_ms to be a positive integer, got 0"),
        (lambda fn: do_bench_ms(fn, warmup_ms=-1), "warmup_ms to be an integer >= 0, got -1"),
        (lambda fn: copy_gbps(multiple=0), "multiple to be a positive integer, got 0"),
        (lambda fn: copy_gbps(buffer_bytes=-4), "buffer_bytes to be a positive integer, got -4"),
        (lambda fn: copy_gbps(buffer_bytes=0, time_ms=lambda f: 1.0), "buffer_bytes to be a positive integer, got 0"),
        (lambda fn: _pair(fn, launches=0), "launches to be a positive integer, got 0"),
        (lambda fn: _pair(fn, launches=2, moved_bytes=-1), "moved_bytes to be an integer >= 0, got -1"),
        (lambda fn: _pair(fn, launches=2, flops=-8), "flops to be an integer >= 0, got -8"),
        (lambda fn: warm_gpu(0), "seconds to be a finite number > 0, got 0"),
        (lambda fn: warm_gpu(-0.5), "seconds to be a finite number > 0, got -0.5"),
        (lambda fn: warm_gpu(float("nan")), "seconds to be a finite number > 0, got nan"),
        (lambda fn: warm_gpu(float("inf")), "seconds to be a finite number > 0, got inf"),
    ],
)
def test_gpu_helpers_refuse_bad_arguments_before_any_work(call: Callable[[Calls], object], message: str) -> None:
    fn = Calls()
    with pytest.raises(ConfigurationError, match=f"expected {message}"):
        call(fn)
    assert fn.count == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("gpu_ms", lambda fn: gpu_ms(fn)),
        ("gpu_ms", lambda fn: gpu_ms(fn, graph=True)),
        ("capture_for_timing", lambda fn: capture_for_timing(fn, 4)),
        ("do_bench_ms", lambda fn: do_bench_ms(fn, graph=True)),
        ("copy_gbps", lambda fn: copy_gbps()),
        ("copy_gbps", lambda fn: copy_gbps(buffer_bytes=1 << 20, kernel=True, time_ms=lambda f: 1.0)),
        ("capture_for_timing", lambda fn: _pair(fn, launches=2)),
        ("warm_gpu", lambda fn: warm_gpu(0.01)),
    ],
)
def test_gpu_timing_needs_a_gpu(name: str, call: Callable[[Calls], object]) -> None:
    fn = Calls()
    with pytest.raises(ConfigurationError, match=f"^{name} needs a CUDA device; "):
        call(fn)
    assert fn.count == 0


def test_gpu_ms_without_a_gpu_points_to_host_us(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigurationError, match="time host-side cost with host_us instead"):
        gpu_ms(lambda: None)


def test_do_bench_ms_without_triton_names_the_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    # A GPU is reported so that the check behind it, Triton's absence, is the one that answers.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.testing", None)
    fn = Calls()
    with pytest.raises(ConfigurationError, match=r"do_bench_ms needs Triton .*gpu_ms times with CUDA events"):
        do_bench_ms(fn)
    assert fn.count == 0


@pytest.mark.gpu
def test_gpu_ms_times_a_kernel_and_a_graph_replay() -> None:
    x = torch.randn(1 << 20, device="cuda")
    assert gpu_ms(lambda: x.mul_(1.0), reps=5) > 0
    assert gpu_ms(lambda: x.mul_(1.0), reps=5, graph=True) > 0
    assert gpu_ms(lambda: x.mul_(1.0), reps=5, flush_l2=False) > 0
    warm_gpu(0.05)


@pytest.mark.gpu
def test_capture_for_timing_holds_every_launch_and_replays_them() -> None:
    count = torch.zeros((), device="cuda")
    graph = capture_for_timing(lambda: count.add_(1), 4, warmup=2)
    assert count.item() == 2 + 4  # the warm-ups, then the one replay that checks the graph
    graph.replay()
    torch.cuda.synchronize()
    assert count.item() == 2 + 4 + 4
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    with torch.cuda.stream(side):  # captured on the current side stream, as a backward must be
        capture_for_timing(lambda: count.add_(1), 1, warmup=0)
    torch.cuda.synchronize()
    assert count.item() == 2 + 4 + 4 + 1


@pytest.mark.gpu
def test_captured_pair_and_the_copy_ceiling() -> None:
    a = torch.zeros(1 << 16, device="cuda")
    b = torch.zeros_like(a)
    pair = CapturedPair.capture("add", lambda: a.add_(1), lambda: b.add_(2), launches=3, moved_bytes=8 * a.numel())
    pair.ours.replay()
    pair.baseline.replay()
    torch.cuda.synchronize()
    # each side: three warm-up calls, the replay that checks the graph (three launches), and the replay above
    assert a[0].item() == 3 + 3 + 3 and b[0].item() == 2 * (3 + 3 + 3) and pair.implementations == {}
    for gbps in (copy_gbps(multiple=1), copy_gbps(buffer_bytes=1 << 24, kernel=True)):
        assert 1 < gbps < 1e5
    pytest.importorskip("triton")
    assert do_bench_ms(lambda: a.add_(1), rep_ms=5) > 0
    assert copy_gbps(multiple=1, time_ms=lambda fn: do_bench_ms(fn, graph=True, rep_ms=5)) > 1
