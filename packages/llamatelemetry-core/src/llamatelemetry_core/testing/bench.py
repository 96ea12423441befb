"""What every benchmark of the repository shares: the device slug, timing, the copy-bandwidth ceiling, one JSON
schema, a Markdown table, targets and the exit status, progress output.

A benchmark script builds a :class:`Report`, adds :class:`Row` s (a measurement beside its baseline of the same
run) and :class:`Target` s (a claim checked against a measurement), and ends with ``return report.finish(out)``:
the table is printed last, ``results.json`` (schema :data:`SCHEMA`) and ``summary.md`` are written under
``benchmarks/results/<slug>/<component>/``, and the exit status is 1 when a target was missed.

Timing on a GPU (:func:`gpu_ms`) flushes the L2 cache between runs (``triton.testing.do_bench`` when Triton is
installed, the same scheme with CUDA events otherwise) or replays a captured CUDA graph (``graph=True``), which
removes the launch cost that a serving engine does not pay either. Host-side cost (:func:`host_us`) is the best
median of several repeats of many calls, in microseconds.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llamatelemetry_core.device import real_device_info
from llamatelemetry_core.errors import ConfigurationError

__all__ = [
    "SCHEMA",
    "Report",
    "Row",
    "Target",
    "copy_gbps",
    "device_slug",
    "envelope",
    "environment",
    "gpu_ms",
    "host_us",
    "markdown_table",
    "progress",
]

SCHEMA = "llamatelemetry-benchmark/1"
"""The schema of every ``results.json``: a ``benchmark`` envelope (:func:`envelope`) beside the results; a
:class:`Report` writes them as ``rows``, ``targets`` and ``extra``."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: torch.device | None = None) -> str:
    """The folder name of a machine class: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``; without a GPU
    (or for a CPU ``device``) ``cpu-`` and the CPU model (host-side timings compare only on the same CPU)."""
    if (device is not None and device.type == "cpu") or not torch.cuda.is_available():
        return "cpu-" + _slug(_cpu_model())
    return _slug(real_device_info(device).name)


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "flash-attn", "pytest-benchmark"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    info = real_device_info()
    return {
        "versions": versions,
        "cuda": torch.version.cuda,
        "device": info.name,
        "compute_capability": None if info.compute_capability is None else ".".join(map(str, info.compute_capability)),
        "cpu": _cpu_model(),
        "cpu_count": torch.get_num_threads(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def envelope(component: str, device: torch.device | None = None) -> dict[str, Any]:
    """What every ``results.json`` holds under ``benchmark``: schema, component, device slug (of ``device``,
    default the GPU if any), environment."""
    return {"schema": SCHEMA, "component": component, "device": device_slug(device), "environment": environment()}


def progress(message: str) -> None:
    """One line of progress on stderr (the table and JSON path go to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def host_us(fn: Callable[[], object], *, calls: int = 1000, repeats: int = 7) -> float:
    """Host time of one call of ``fn`` in microseconds: the lowest of ``repeats`` means over ``calls`` calls."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)


def gpu_ms(fn: Callable[[], object], *, graph: bool = False, reps: int = 50, warmup: int = 5) -> float:
    """Median GPU time of ``fn`` in milliseconds, with the L2 cache flushed before each run.

    ``graph=True`` captures ``fn`` into a CUDA graph once and times its replay (the flush still runs before
    each replay, outside the graph): launch cost is then gone, as in a serving engine's decode step. Raises
    :class:`ConfigurationError` without a GPU.
    """
    if not torch.cuda.is_available():
        raise ConfigurationError("gpu_ms needs a CUDA device; time host-side cost with host_us instead")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    run: Callable[[], object] = fn
    if graph:
        stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        run = captured.replay
    flush = torch.empty(2 * _l2_bytes(), dtype=torch.int8, device="cuda")
    samples: list[float] = []
    for _ in range(reps):
        flush.zero_()
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def copy_gbps(*, multiple: int = 8) -> float:
    """The device-to-device copy bandwidth (read + write, GB/s) on a buffer ``multiple`` times the L2 size: the
    ceiling a memory-bound kernel is compared with, measured in the same run."""
    if not torch.cuda.is_available():
        raise ConfigurationError("copy_gbps needs a CUDA device")
    n = multiple * _l2_bytes()
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = gpu_ms(lambda: dst.copy_(src), reps=20)
    return 2 * n / (ms * 1e-3) / 1e9


@dataclass(frozen=True)
class Row:
    """One measurement beside its baseline of the same run: ``ratio`` is baseline / value for times."""

    group: str
    name: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_name: str | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.value == 0:
            return None
        return self.baseline / self.value if self.unit in ("ms", "us") else self.value / self.baseline


@dataclass(frozen=True)
class Target:
    """A claim: ``measured`` must be ``>=`` (or ``<=`` when ``at_most``) ``goal``."""

    name: str
    measured: float
    goal: float
    at_most: bool = False

    @property
    def met(self) -> bool:
        return self.measured <= self.goal if self.at_most else self.measured >= self.goal


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (pipes in cells are escaped)."""
    cells = [[c.replace("|", "\\|") for c in row] for row in [header, *rows]]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells[1:]]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@dataclass
class Report:
    """The results of one benchmark script run; see the module docstring."""

    component: str
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        progress(f"{row.group} / {row.name}: {_fmt(row.value)} {row.unit}")
        self.rows.append(row)
        return row

    def check(self, name: str, measured: float, goal: float, *, at_most: bool = False) -> bool:
        target = Target(name, measured, goal, at_most)
        self.targets.append(target)
        return target.met

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": envelope(self.component),
            "rows": [{**asdict(r), "ratio": r.ratio} for r in self.rows],
            "targets": [{**asdict(t), "met": t.met} for t in self.targets],
            "extra": self.extra,
        }

    def markdown(self) -> str:
        table = markdown_table(
            ["group", "case", "value", "unit", "baseline", "ratio", "note"],
            [
                [r.group, r.name, _fmt(r.value), r.unit, r.baseline_name or "-", _fmt(r.ratio), r.note]
                for r in self.rows
            ],
        )
        if not self.targets:
            return table
        verdicts = markdown_table(
            ["target", "measured", "goal", "met"],
            [
                [t.name, _fmt(t.measured), ("<= " if t.at_most else ">= ") + _fmt(t.goal), "yes" if t.met else "NO"]
                for t in self.targets
            ],
        )
        return f"{table}\n\n{verdicts}"

    def finish(self, out: Path | None = None, *, results_root: Path | None = None) -> int:
        """Write ``results.json`` and ``summary.md`` (under ``out``, or ``results_root/<slug>/<component>``), print
        the table last, and return the exit status: 1 when a target was missed, else 0."""
        if out is None:
            root = results_root if results_root is not None else Path.cwd() / "benchmarks" / "results"
            out = root / device_slug() / self.component
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
        text = self.markdown()
        (out / "summary.md").write_text(text + "\n", encoding="utf-8")
        print(f"results: {out / 'results.json'}")
        print(text)
        missed = [t.name for t in self.targets if not t.met]
        if missed:
            print(f"missed targets: {', '.join(missed)}")
            return 1
        return 0
