"""pytest-benchmark settings shared by every benchmark: results stored per device, compared with that device's
baseline, and the GPU timing the GPU suites share.

Storage. pytest-benchmark's default storage (``./.benchmarks``) is keyed by the machine's CPU, not its GPU, so a
comparison could put an H100 run beside a T4 baseline. Here the default storage becomes
``benchmarks/results/<device-slug>/pytest-benchmark`` (the GPU model, or ``cpu-<model>`` without one) and the
GPU's name is added to the machine info.

Baseline. ``--device-baseline=median:15%`` compares the run with the newest stored baseline of this device
(``<storage>/<machine-id>/NNNN_baseline*.json``, what ``--benchmark-save=baseline`` writes) and fails the run
when a benchmark regressed by more than the expression (pytest-benchmark's ``--benchmark-compare-fail`` syntax).
Without a stored baseline the run says so and is saved as this device's first baseline; a run that saves a
baseline itself (``--benchmark-save=baseline...``) is not compared. The decision is printed in the header and
again at the end of the run.

GPU timing (the ``gpu_bench`` fixture): a case is a library call and its PyTorch baseline, each captured
``launches`` times in one CUDA graph (``llamatelemetry_core.testing.bench.CapturedPair``), and each benchmark
round replays one side's graph and synchronizes (``benchmark.pedantic``). The recorded time is that of one
replay, ``launches`` calls back to back with no host work between them; ``extra_info`` holds the time per call,
the achieved GB/s or TFLOP/s, the share of the device-to-device copy bandwidth measured in the same run, and
for the library's side the same figures of the PyTorch baseline, which is its own benchmark in the same group,
and which implementation each operation of the library's call ran (:func:`run_recorded`, which refuses the
PyTorch fallback). What a graph cannot hold is timed as calls from Python, synchronized at the end of each round.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from llamatelemetry_core.device import real_device_info
from llamatelemetry_core.recording import record_selections
from llamatelemetry_core.selection import REFERENCE
from llamatelemetry_core.testing import assert_close, tolerance_for
from llamatelemetry_core.testing.bench import CapturedPair, copy_gbps, device_slug, gpu_ms

RESULTS = Path(__file__).parent / "results"
_DEFAULT_STORAGE = "file://./.benchmarks"
BASELINE_PREFIX = "baseline"
# A baseline file: pytest-benchmark's counter, then the name given to --benchmark-save (baseline, baseline-...).
_BASELINE_FILE = re.compile(rf"^(\d{{4}})_{BASELINE_PREFIX}[^/]*\.json$")
ROUNDS = 60  # replays timed per benchmark: enough for a stable median, a fraction of a second each
WARMUP_ROUNDS = 3
T = TypeVar("T")


def find_baseline(storage: Path, machine_id: str) -> Path | None:
    """The newest baseline stored for one machine (highest counter of ``storage/machine_id/NNNN_baseline*.json``),
    or ``None`` when there is none. Runs saved under other names (``--benchmark-autosave``) are not baselines."""
    folder = storage / machine_id
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_file() and (m := _BASELINE_FILE.match(p.name))]
    return max(found)[1] if found else None


def storage_path(option: str) -> Path | None:
    """The folder of a ``file://`` pytest-benchmark storage, ``None`` for another kind (elasticsearch)."""
    if option.startswith("file://"):
        return Path(option.removeprefix("file://"))
    return None if "://" in option else Path(option)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device-baseline",
        metavar="EXPR",
        default=None,
        help="compare with the newest stored baseline of this device and fail when EXPR regressed "
        "(--benchmark-compare-fail syntax, e.g. median:15%%); without a baseline, store this run as one",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "benchmark_storage", None) == _DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{RESULTS / device_slug() / 'pytest-benchmark'}"
    expression = config.getoption("--device-baseline", default=None)
    config.stash[_DECISION] = "" if expression is None else _plan_comparison(config, expression)


_DECISION = pytest.StashKey[str]()


def _plan_comparison(config: pytest.Config, expression: str) -> str:
    """Set pytest-benchmark's compare options for ``--device-baseline``; return what was decided, in words."""
    from pytest_benchmark.utils import get_machine_id, parse_compare_fail

    try:
        check = parse_compare_fail(expression)  # type: ignore[no-untyped-call]
    except argparse.ArgumentTypeError as exc:
        raise pytest.UsageError(f"--device-baseline: {exc} Expected e.g. median:15% (slower medians fail).") from exc
    machine_id: str = get_machine_id()  # type: ignore[no-untyped-call]
    storage = storage_path(str(config.option.benchmark_storage))
    if storage is None:
        raise pytest.UsageError("--device-baseline needs a file:// benchmark storage")
    where = storage / machine_id
    saving = config.option.benchmark_save
    if saving and str(saving).startswith(BASELINE_PREFIX):
        return f"saving a new baseline ({saving}) under {where}: not compared"
    baseline = find_baseline(storage, machine_id)
    if baseline is None:
        if not saving and not config.option.benchmark_autosave:
            config.option.benchmark_save = BASELINE_PREFIX
        return (
            f"no stored baseline for {device_slug()} under {where}: not compared; "
            f"this run is saved as {config.option.benchmark_save or 'an autosaved run'}"
        )
    if config.option.benchmark_compare:
        raise pytest.UsageError("give --device-baseline or --benchmark-compare, not both")
    config.option.benchmark_compare = str(baseline)
    config.option.benchmark_compare_fail = [check, *(config.option.benchmark_compare_fail or [])]
    return f"compared with {baseline}; a benchmark fails beyond {expression}"


def pytest_report_header(config: pytest.Config) -> str | None:
    decision = config.stash.get(_DECISION, "")
    return f"device baseline: {decision}" if decision else None


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    decision = config.stash.get(_DECISION, "")
    if decision:
        terminalreporter.write_line(f"device baseline: {decision}")


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    device = real_device_info()
    machine_info["gpu"] = device.name if device.is_cuda else None
    machine_info["compute_capability"] = None if device.sm is None else str(device.sm)


# --- GPU timing --------------------------------------------------------------------------------------------------


def replay_seconds(graph: torch.cuda.CUDAGraph) -> float:
    """Median seconds of one replay of ``graph`` (CUDA events, 20 replays after 2, L2 left as the previous replay
    left it, as between the rounds of ``benchmark.pedantic``)."""
    return gpu_ms(graph.replay, reps=20, warmup=2, flush_l2=False) * 1e-3


def _figures(seconds_per_call: float, moved_bytes: int, flops: int, copy: float) -> dict[str, float]:
    """GB/s (bytes read + written once), its share of the copy bandwidth, and TFLOP/s, where given."""
    out: dict[str, float] = {}
    if moved_bytes:
        out["gbps"] = moved_bytes / seconds_per_call / 1e9
        out["pct_of_copy"] = 100.0 * out["gbps"] / copy
    if flops:
        out["tflops"] = flops / seconds_per_call / 1e12
    return out


class GpuBench:
    """Times GPU work with ``benchmark.pedantic``; see the module docstring."""

    def __init__(self, benchmark: Any, copy: float) -> None:
        self.benchmark = benchmark
        self.copy = copy

    def pair(self, case: CapturedPair, *, ours: bool) -> None:
        """Benchmark replays of one side of ``case``: the library's graph when ``ours``, else the baseline's.

        Each replay runs ``case.launches`` calls, each moving ``case.moved_bytes`` or computing ``case.flops``. The
        library's row also carries the baseline's figures and the ratio, both graphs timed here again with CUDA
        events (:func:`replay_seconds`), and what the library's call dispatched to (``case.implementations``, from
        :func:`run_recorded`)."""
        graph = case.ours if ours else case.baseline

        def run() -> None:
            graph.replay()
            torch.cuda.synchronize()

        info = self._time(case.group, run, case.launches, case.moved_bytes, case.flops)
        if ours and info:
            theirs = replay_seconds(case.baseline) / case.launches
            mine = replay_seconds(case.ours) / case.launches
            info["baseline"] = case.baseline_name
            info["baseline_us_per_call"] = theirs * 1e6
            info["speedup_vs_baseline"] = theirs / mine
            figures = _figures(theirs, case.moved_bytes, case.flops, self.copy)
            info.update({f"baseline_{k}": v for k, v in figures.items()})
            if case.implementations:
                chosen = sorted(case.implementations.items())
                info["implementations"] = ", ".join(f"{op}={impl}" for op, impl in chosen)
        self.benchmark.extra_info.update(info)

    def synchronized(
        self,
        group: str,
        fn: Callable[[], object],
        *,
        setup: Callable[[], object] | None = None,
        moved_bytes: int = 0,
        flops: int = 0,
    ) -> None:
        """Benchmark ``fn`` called from Python and synchronized at the end of each round, host work included:
        for what a CUDA graph cannot hold (or what replays graphs itself). ``setup`` runs untimed before each
        round (to put back state that a call changes)."""

        def run() -> None:
            fn()
            torch.cuda.synchronize()

        def prepare() -> None:
            if setup is not None:
                setup()
            torch.cuda.synchronize()

        self.benchmark.extra_info.update(self._time(group, run, 1, moved_bytes, flops, prepare))

    def _time(
        self,
        group: str,
        run: Callable[[], None],
        launches: int,
        moved_bytes: int,
        flops: int,
        setup: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        self.benchmark.group = group
        self.benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
        if self.benchmark.stats is None:  # --benchmark-disable: the call ran once, untimed
            return {}
        per_call = float(self.benchmark.stats.stats.median) / launches
        info: dict[str, Any] = {"launches": launches, "us_per_call": per_call * 1e6, "copy_gbps": self.copy}
        info.update(_figures(per_call, moved_bytes, flops, self.copy))
        return info


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """The device-to-device copy bandwidth of this run (GB/s, read + write): the memory-bound ceiling."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return copy_gbps()


@pytest.fixture
def gpu_bench(benchmark: Any, copy_bandwidth: float) -> GpuBench:
    return GpuBench(benchmark, copy_bandwidth)


def check_close(actual: torch.Tensor, expected: torch.Tensor, *, name: str, scale: float = 1.0) -> None:
    """``actual`` within the shared tolerance of its dtype (times ``scale``) of ``expected``, compared on the
    device (large outputs), with the library's detailed message when it is not."""
    tol = tolerance_for(actual.dtype).scaled(scale)
    got, want = actual.detach().float(), expected.detach().float()
    if bool(((got - want).abs() <= tol.atol + tol.rtol * want.abs()).all()):
        return
    assert_close(actual, expected, atol=tol.atol, rtol=tol.rtol, name=name)


def run_recorded(fn: Callable[[], T]) -> tuple[T, dict[str, str]]:
    """Call ``fn`` once; return its result and the implementation each operation it dispatched ran.

    Raises ``AssertionError`` when one ran its PyTorch reference: on a GPU that would time the fallback under
    the library's name (a kernel that failed to build here, a missing Triton)."""
    with record_selections() as recorder:
        result = fn()
    chosen = {s.operation: s.implementation for s in recorder.selections}
    fallbacks = sorted(op for op, impl in chosen.items() if impl == REFERENCE)
    assert not fallbacks, f"{', '.join(fallbacks)} ran the PyTorch reference on this GPU: nothing to benchmark"
    return result, chosen


@pytest.fixture(scope="session")
def recorded() -> Callable[[Callable[[], Any]], tuple[Any, dict[str, str]]]:
    """:func:`run_recorded`, for the fixtures that build a case once."""
    return run_recorded


@pytest.fixture(scope="session")
def close() -> Callable[..., None]:
    """:func:`check_close`, for the fixtures that check each case once."""
    return check_close
