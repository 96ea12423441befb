"""What every benchmark of the repository shares: the device slug, timing, the copy-bandwidth ceiling, one JSON
schema, a Markdown table, targets and the exit status, progress output.

A benchmark script builds a :class:`Report`, adds :class:`Row` s (a measurement beside its baseline of the same
run) and :class:`Target` s (a claim checked against a measurement), and ends with ``return report.finish(out)``:
the table is printed last, ``results.json`` (schema :data:`SCHEMA`) and ``summary.md`` are written under
``benchmarks/results/<slug>/<component>/``, and the exit status is 1 when a target was missed.

Timing on a GPU: :func:`gpu_ms` times with CUDA events and flushes the L2 cache before each run;
:func:`do_bench_ms` is the median of ``triton.testing.do_bench`` (which flushes L2 too, and repeats for a time
rather than a count). Both replay a captured CUDA graph with ``graph=True``, which removes the launch cost that a
serving engine does not pay either; :func:`capture_for_timing` is that capture (warm-up on a side stream, ``fn``
captured one or more times back to back), and :class:`CapturedPair` holds a library call and its baseline
captured that way for the pytest-benchmark suites. :func:`copy_gbps` is the copy-bandwidth ceiling, timed by
either; :func:`warm_gpu` brings the clocks up before a series of timings. Host-side cost (:func:`host_us`) is the
best median of several repeats of many calls, in microseconds.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import math
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
from llamatelemetry_core.toolchain import TRITON_INSTALL
from llamatelemetry_core.validation import check_non_negative_int, check_positive_int

__all__ = [
    "SCHEMA",
    "CapturedPair",
    "Report",
    "Row",
    "Target",
    "capture_for_timing",
    "copy_gbps",
    "device_slug",
    "do_bench_ms",
    "envelope",
    "environment",
    "gpu_ms",
    "host_us",
    "markdown_table",
    "progress",
    "warm_gpu",
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


def _require_gpu(what: str, advice: str = "run it on a machine with an NVIDIA GPU") -> None:
    if not torch.cuda.is_available():
        raise ConfigurationError(f"{what} needs a CUDA device; {advice}")


def _l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)


def warm_gpu(seconds: float = 0.5) -> None:
    """Run fp16 matmuls for about ``seconds`` seconds, so that the timings after it start at full clocks (after
    a long Triton compile, say). Raises :class:`ConfigurationError` when ``seconds`` is not a finite number > 0,
    and without a GPU."""
    given: object = seconds  # checked as the caller may pass it, not as annotated
    if isinstance(given, bool) or not isinstance(given, int | float) or not 0 < given < math.inf:
        raise ConfigurationError(f"expected seconds to be a finite number > 0, got {seconds!r}")
    _require_gpu("warm_gpu")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    end = time.time() + seconds
    while time.time() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def capture_for_timing(
    fn: Callable[[], object], launches: int = 1, *, warmup: int = 3, stream: torch.cuda.Stream | None = None
) -> torch.cuda.CUDAGraph:
    """``fn`` captured ``launches`` times back to back in one CUDA graph, replayed once, ready to time.

    ``fn`` first runs ``warmup`` times on the capture stream, so that Triton compiles, the caching allocator
    settles and lazy initialisation happen outside the capture; the device synchronises; ``fn`` is captured
    ``launches`` times; the graph is replayed once and the device synchronises again, so that a graph that cannot
    replay fails here rather than in a timing loop. The capture stream is ``stream``, else the current stream when
    it is a side stream (autograd runs a backward on the stream its forward ran on, so a backward is captured
    there), else a new side stream (the default stream cannot capture). Every tensor ``fn`` touches must stay alive
    while the graph is replayed.

    Raises :class:`ConfigurationError` when ``launches`` is not an integer >= 1 or ``warmup`` not one >= 0, and
    without a GPU.
    """
    check_positive_int(launches, "launches")
    check_non_negative_int(warmup, "warmup")
    _require_gpu("capture_for_timing")
    current = torch.cuda.current_stream()
    if stream is None:
        side = current != torch.cuda.default_stream()
        stream = current if side else torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    current.wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(launches):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def gpu_ms(
    fn: Callable[[], object], *, graph: bool = False, reps: int = 50, warmup: int = 5, flush_l2: bool = True
) -> float:
    """Median GPU time of ``fn`` in milliseconds over ``reps`` runs timed with CUDA events, after ``warmup`` runs.

    The L2 cache is flushed before each run (a buffer twice its size is cleared, outside the timed region) unless
    ``flush_l2=False``, for a caller whose work is meant to find its inputs where the previous run left them.
    ``graph=True`` captures ``fn`` once with :func:`capture_for_timing` (the warm-up runs there) and times its replay:
    launch cost is then gone, as in a serving engine's decode step.

    Raises :class:`ConfigurationError` when ``reps`` is not an integer >= 1 or ``warmup`` not one >= 0, and
    without a GPU.
    """
    check_positive_int(reps, "reps")
    check_non_negative_int(warmup, "warmup")
    _require_gpu("gpu_ms", "time host-side cost with host_us instead")
    run: Callable[[], object] = fn
    if graph:
        run = capture_for_timing(fn, warmup=warmup).replay
    else:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
    flush = torch.empty(2 * _l2_bytes(), dtype=torch.int8, device="cuda") if flush_l2 else None
    samples: list[float] = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def do_bench_ms(fn: Callable[[], object], *, graph: bool = False, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn`` in milliseconds by ``triton.testing.do_bench``, which flushes the L2 cache before
    each repetition and repeats for about ``rep_ms`` ms after about ``warmup_ms`` ms of warm-up.

    ``graph=True`` times the replay of ``fn`` captured once with :func:`capture_for_timing`: GPU time alone, no host
    work per call. Otherwise ``fn`` is called once (Triton compiles outside the timing) and then from Python at
    every repetition: where the host takes longer to issue a call than the GPU takes to run it, that is what
    it measures.

    Raises :class:`ConfigurationError` when ``rep_ms`` is not an integer >= 1 or ``warmup_ms`` not one >= 0,
    without a GPU, and without Triton (:func:`gpu_ms` times with CUDA events alone).
    """
    check_positive_int(rep_ms, "rep_ms")
    check_non_negative_int(warmup_ms, "warmup_ms")
    _require_gpu("do_bench_ms")
    try:
        from triton.testing import do_bench
    except ImportError as exc:
        raise ConfigurationError(
            f"do_bench_ms needs Triton ({TRITON_INSTALL}); gpu_ms times with CUDA events without it"
        ) from exc
    run: Callable[[], object] = fn
    if graph:
        run = capture_for_timing(fn).replay
    else:
        fn()
        torch.cuda.synchronize()
    return float(do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_gbps(
    *,
    multiple: int = 8,
    buffer_bytes: int | None = None,
    kernel: bool = False,
    time_ms: Callable[[Callable[[], object]], float] | None = None,
) -> float:
    """The device-to-device copy bandwidth in GB/s (bytes read + written, over the time of one copy): the
    ceiling a memory-bound kernel is compared with, measured in the same run.

    The source buffer holds ``buffer_bytes`` bytes, by default ``multiple`` times the L2 size, so that the copy
    runs from device memory. ``kernel=True`` copies with an elementwise kernel (an exact fp16 multiply by one)
    instead of ``copy_``: a ``copy_`` captured in a CUDA graph becomes a memcpy node, which the driver may run on a
    copy engine slower than the SMs. ``time_ms`` times one copy in milliseconds: by default :func:`gpu_ms` over
    20 runs (eager, L2 flushed); pass ``functools.partial(do_bench_ms, graph=True)`` to time the copy the way the
    kernels beside it are timed.

    Raises :class:`ConfigurationError` when ``multiple`` or ``buffer_bytes`` is not an integer >= 1, and without
    a GPU.
    """
    check_positive_int(multiple, "multiple")
    if buffer_bytes is not None:
        check_positive_int(buffer_bytes, "buffer_bytes")
    _require_gpu("copy_gbps")
    n = buffer_bytes if buffer_bytes is not None else multiple * _l2_bytes()
    dtype = torch.float16 if kernel else torch.uint8
    src = torch.empty(max(n // dtype.itemsize, 1), dtype=dtype, device="cuda")
    dst = torch.empty_like(src)
    timer = time_ms if time_ms is not None else functools.partial(gpu_ms, reps=20)
    copy: Callable[[], object] = (lambda: torch.mul(src, 1.0, out=dst)) if kernel else (lambda: dst.copy_(src))
    ms = timer(copy)
    return 2 * src.nbytes / (ms * 1e-3) / 1e9


@dataclass(frozen=True)
class CapturedPair:
    """A library call and its baseline, each captured ``launches`` times back to back in one CUDA graph
    (:func:`capture_for_timing`), with what one call moves (``moved_bytes``, read + written) or computes (``flops``):
    both sides of a pytest-benchmark comparison, built once per case and replayed by each side's benchmark.

    ``implementations`` records which implementation each operation of the library's call ran, and
    ``baseline_name`` names the baseline in the library's row.
    """

    group: str
    ours: torch.cuda.CUDAGraph
    baseline: torch.cuda.CUDAGraph
    launches: int
    baseline_name: str = "torch"
    moved_bytes: int = 0
    flops: int = 0
    implementations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def capture(
        cls,
        group: str,
        ours: Callable[[], object],
        baseline: Callable[[], object],
        *,
        launches: int,
        baseline_name: str = "torch",
        moved_bytes: int = 0,
        flops: int = 0,
        implementations: dict[str, str] | None = None,
    ) -> CapturedPair:
        """Capture ``ours`` and ``baseline`` ``launches`` times each. Raises :class:`ConfigurationError` when
        ``launches`` is not an integer >= 1, ``moved_bytes`` or ``flops`` not one >= 0, and without a GPU."""
        check_positive_int(launches, "launches")
        check_non_negative_int(moved_bytes, "moved_bytes")
        check_non_negative_int(flops, "flops")
        return cls(
            group,
            capture_for_timing(ours, launches),
            capture_for_timing(baseline, launches),
            launches,
            baseline_name,
            moved_bytes,
            flops,
            dict(implementations or {}),
        )


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
