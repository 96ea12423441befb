"""The fused ``matmul_tensor_core`` path on a GPU: correctness against the reference, then its speed, and the
crossover that ``FUSED_MATMUL_MAX_MNK`` should hold.

Usage (from the repository root; no network, no installs; under two minutes on an H100/H200):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/tensorcore/check_fused_matmul.py
    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/tensorcore/check_fused_matmul.py --split-k

``--split-k`` runs only the products whose grid of output tiles is small (``1 x 4096 x 4096``, ``4 x 4096 x
4096``, ``16 x 2048 x 8192``, 256^3, 512^3, 768^3), where K is split over several programs per tile, into
``benchmarks/results/<gpu-slug>/tensorcore-fused-split-k``.

1. Correctness: for square products 64..8192 and skinny ones (decode ``1 x 4096 x 4096``, ``128 x 4096 x 11008``
   and more), fp32 inputs at ordinary scale, far outside fp16's range both ways, and with inf/NaN: the fused
   path (launched directly, whatever the threshold, split over K where its heuristic splits) against the
   reference (``backend="reference"``: fp32 products of the rounded inputs, TF32 off); where the heuristic does
   not split, a forced split in two as well. Non-finite elements must match exactly; finite ones may differ by
   the fp16 rounding of a differently ordered fp32 sum: ``|fused - ref| <= 2^-10 |ref| + 2 K 2^-24 (|A| @ |B|)``.
2. Timing (``llamatelemetry_core.testing.bench.gpu_ms``: median, L2 flushed, eager launches): fp32
   ``torch.matmul`` with TF32 off (the baseline), the cuBLAS range-scaled path (``backend="tensor_core"``), the
   fused path (its launcher called directly, so that it runs above the threshold too; unsplit beside it where
   it splits K) and the automatic choice; then the automatic choice and fp32 replayed from CUDA graphs (GPU
   time without the host's share), and the unsplit fused path the same way where it splits. With ``--split-k``,
   also the fused path replayed with K forced into 1, 2, 3, 4, 6, 8, ... 32 ranges: the data to tune the split.
3. The recommended threshold: the largest measured ``batch*M*N*K`` up to which the fused path is never more
   than 2% slower than the cuBLAS path, against ``FUSED_MATMUL_MAX_MNK`` as set.

Writes ``results.json`` and ``summary.md`` under ``benchmarks/results/<gpu-slug>/tensorcore-fused`` and prints the
full table, then a short one (per product: splits, fused and fp32 in ms, eager and replayed) last. Exit status 1
when a product is wrong, or the automatic choice is slower than fp32 at some size (eager or replayed).
Without a GPU (``TRITON_INTERPRET=1``) it checks correctness in the interpreter at the ``--sizes`` given (tiny)
and skips the timing: a smoke test of the script.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llamatelemetry_core import record_selections
from llamatelemetry_core.testing.bench import Report, Row, copy_gbps, device_slug, gpu_ms, markdown_table, progress
from llamatelemetry_tensorcore import matmul_tensor_core
from llamatelemetry_tensorcore._fused_kernels import fused_matmul
from llamatelemetry_tensorcore.fused_matmul import (
    FUSED_MATMUL_MAX_MNK,
    choose_fused_tiles,
    choose_split_k,
    one_launch,
    split_chunks,
)

SQUARES = (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
SKINNY: tuple[tuple[int, int, int], ...] = (
    (1, 4096, 4096),  # M, K, N: a decode step
    (4, 4096, 4096),
    (16, 4096, 4096),
    (16, 2048, 8192),
    (128, 4096, 4096),
    (128, 4096, 11008),
    (128, 11008, 4096),
    (512, 4096, 4096),
    (2048, 4096, 11008),
)
SPLIT_K: tuple[tuple[int, int, int], ...] = (
    (1, 4096, 4096),
    (4, 4096, 4096),
    (16, 2048, 8192),
    (256, 256, 256),
    (512, 512, 512),
    (768, 768, 768),
)
SCALES = {"ordinary": (1.0, 1.0), "beyond fp16": (1e6, 3e3), "tiny": (1e-20, 1e-12), "mixed": (1e30, 1e-30)}
SLOWER_ALLOWED = 1.02  # fused within 2% of cuBLAS still counts as winning (timing noise)


def _inputs(m: int, k: int, n: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(m, k, device=device, generator=gen), torch.randn(k, n, device=device, generator=gen)


def automatic_splits(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many ranges of K the fused launcher splits ``a @ b`` into by itself (2-d inputs; 1: no split)."""
    (m, k), n = a.shape, b.shape[-1]
    tiles = choose_fused_tiles(m, n, 1, a.device)
    if one_launch(a.numel(), b.numel(), math.ceil(m / tiles.block_m) * math.ceil(n / tiles.block_n)):
        return 1  # small dense inputs take one launch, which never splits
    return choose_split_k(m, n, k, 1, tiles, a.device).splits


def wrong_elements(a: torch.Tensor, b: torch.Tensor, splits: int | None = None) -> tuple[int, float]:
    """(elements of the fused product outside the bound, largest |fused - ref| / bound) against the reference."""
    got = fused_matmul(a, b, None, splits=splits)
    ref = matmul_tensor_core(a, b, backend="reference")
    finite, inf = torch.isfinite(ref), ref.isinf()
    same_kind = torch.equal(got.isnan(), ref.isnan()) and torch.equal(got.isinf(), inf)
    same_kind = same_kind and torch.equal(got[inf], ref[inf])
    a_finite, b_finite = (torch.nan_to_num(x, posinf=0, neginf=0).abs() for x in (a, b))
    magnitude = torch.matmul(a_finite, b_finite)
    bound = 2.0**-10 * ref.abs() + 2 * a.shape[-1] * 2.0**-24 * magnitude
    excess = torch.where(finite, (got - ref).abs() - bound, torch.zeros_like(ref))
    worst = float(((got - ref).abs()[finite] / bound[finite].clamp_min(1e-38)).max()) if finite.any() else 0.0
    return int((excess > 0).sum()) + (0 if same_kind else 1), worst


def check_correctness(report: Report, shapes: list[tuple[int, int, int]], device: torch.device) -> None:
    """Every shape at every scaling; one row and one target for all of them (the cases go to the JSON)."""
    cases: dict[str, dict[str, float]] = {}
    for m, k, n in shapes:
        for label, (scale_a, scale_b) in SCALES.items():
            a, b = _inputs(m, k, n, device, seed=m + k + n)
            a, b = a * scale_a, b * scale_b
            if label == "mixed":
                a[0, 0], b[-1, -1] = float("inf"), float("nan")
            # the launcher's own choice, and a split in two where it does not split by itself
            choices = [None] if automatic_splits(a, b) > 1 else [None, 2]
            for splits in choices:
                bad, worst = wrong_elements(a, b, splits)
                case = f"{m}x{k}x{n} {label}" + (" (split in 2)" if splits else "")
                cases[case] = {"wrong_elements": bad, "worst_of_bound": worst}
                progress(f"correctness {case}: {bad} wrong, worst {worst:.3g} of the bound")
    wrong = sum(int(c["wrong_elements"]) for c in cases.values())
    worst = max(c["worst_of_bound"] for c in cases.values())
    report.extra["correctness"] = cases
    note = f"{len(cases)} cases; worst |fused - ref| = {worst:.3g} of the bound"
    report.add(Row("correctness", "fused vs reference: elements beyond the bound", float(wrong), "elements", note=note))
    report.check("fused vs reference: elements beyond the bound", float(wrong), 0.0, at_most=True)


def _timed(fn: Callable[[], object]) -> float:
    return gpu_ms(fn, reps=20, warmup=3)


@dataclass(frozen=True)
class Timings:
    """One shape's times in ms: eager (a call from Python each time), and ``*_graph`` replayed from a CUDA graph
    (GPU time alone, no host work). ``two`` is the two-launch form where one launch is chosen; ``unsplit`` the
    fused path with K unsplit where it splits (``splits`` ranges)."""

    fp32: float
    scaled: float
    fused: float
    auto: float
    fp32_graph: float
    auto_graph: float
    chosen: str
    splits: int
    two: float | None = None
    unsplit: float | None = None
    unsplit_graph: float | None = None


def _time_shape(m: int, k: int, n: int, device: torch.device) -> Timings:
    """fp32, cuBLAS range-scaled, fused and the automatic choice for one shape (see :class:`Timings`)."""
    a, b = _inputs(m, k, n, device, seed=1)
    splits = automatic_splits(a, b)
    with record_selections() as rec:
        matmul_tensor_core(a, b)

    def replayed(fn: Callable[[], object]) -> float:
        return gpu_ms(fn, graph=True, reps=20, warmup=3)

    def unsplit() -> object:
        return fused_matmul(a, b, None, splits=1)

    return Timings(
        fp32=_timed(lambda: torch.matmul(a, b)),
        scaled=_timed(lambda: matmul_tensor_core(a, b, backend="tensor_core")),
        fused=_timed(lambda: fused_matmul(a, b, None)),
        auto=_timed(lambda: matmul_tensor_core(a, b)),
        fp32_graph=replayed(lambda: torch.matmul(a, b)),
        auto_graph=replayed(lambda: matmul_tensor_core(a, b)),
        chosen=rec.last("matmul_tensor_core") or "?",
        splits=splits,
        # where one launch is chosen, the two-launch form beside it (FUSED_ONE_LAUNCH_MAX_ELEMENTS is a guess)
        two=_timed(lambda: fused_matmul(a, b, None, launches=2)) if one_launch(a.numel(), b.numel()) else None,
        unsplit=_timed(unsplit) if splits > 1 else None,
        unsplit_graph=replayed(unsplit) if splits > 1 else None,
    )


def time_paths(
    report: Report, shapes: list[tuple[int, int, int]], device: torch.device
) -> list[tuple[tuple[int, int, int], Timings]]:
    """Time the paths per shape into ``report``; returns each shape with its timings."""
    measured = []
    for m, k, n in shapes:
        t = _time_shape(m, k, n, device)
        torch.cuda.empty_cache()
        name = f"{m}x{k}x{n}"
        tflop = 2.0 * m * n * k / 1e9  # TFLOP/s when divided by milliseconds
        report.add(Row(name, "fp32 torch.matmul (TF32 off)", t.fp32, "ms", note=f"{tflop / t.fp32:.1f} TFLOP/s"))
        report.add(Row(name, "tensor_core (cuBLAS, range-scaled)", t.scaled, "ms", t.fp32, "fp32"))
        launches = "one launch" if t.two is not None else "two launches"
        launches = f"K split in {t.splits}" if t.splits > 1 else launches
        note = f"{tflop / t.fused:.1f} TFLOP/s"
        report.add(Row(name, f"fused, {launches} (forced)", t.fused, "ms", t.fp32, "fp32", note=note))
        if t.two is not None:
            report.add(Row(name, "fused, two launches (forced)", t.two, "ms", t.fp32, "fp32"))
        replay = "fp32, graph replay"
        if t.unsplit is not None and t.unsplit_graph is not None:
            report.add(Row(name, "fused, K unsplit (forced)", t.unsplit, "ms", t.fp32, "fp32"))
            report.add(Row(name, "fused, K unsplit (forced), replayed", t.unsplit_graph, "ms", t.fp32_graph, replay))
        report.add(Row(name, f"automatic ({t.chosen})", t.auto, "ms", t.fp32, "fp32"))
        report.add(Row(name, f"automatic ({t.chosen}), graph replay", t.auto_graph, "ms", t.fp32_graph, replay))
        report.check(f"{name}: automatic choice >= 1.0x fp32", t.fp32 / t.auto, 1.0)
        report.check(f"{name}: automatic choice, graph replay >= 1.0x fp32", t.fp32_graph / t.auto_graph, 1.0)
        measured.append(((m, k, n), t))
    return measured


SWEPT_SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def sweep_splits(report: Report, shapes: list[tuple[int, int, int]], device: torch.device) -> dict[str, str]:
    """The fused launcher replayed from CUDA graphs with K forced into each of :data:`SWEPT_SPLITS` (as many as the
    tile depth allows), per shape: the data ``SPLIT_K_PROGRAMS_PER_SM`` and ``SPLIT_K_MIN_CHUNK`` are tuned on.
    Returns the best count and its time per shape (``"4: 12.3 us"``)."""
    best: dict[str, str] = {}
    for m, k, n in shapes:
        a, b = _inputs(m, k, n, device, seed=2)
        tiles = choose_fused_tiles(m, n, 1, a.device)
        counts = dict.fromkeys(split_chunks(k, s, tiles.block_k, m * n).splits for s in SWEPT_SPLITS)
        times = {}
        for count in counts:

            def split(x: torch.Tensor = a, y: torch.Tensor = b, splits: int = count) -> torch.Tensor:
                return fused_matmul(x, y, None, splits=splits)

            times[count] = gpu_ms(split, graph=True, reps=20, warmup=3)
            report.add(Row(f"{m}x{k}x{n}", f"fused, K in {count} (forced), graph replay", times[count], "ms"))
        fastest = min(times, key=lambda c: times[c])
        best[f"{m}x{k}x{n}"] = f"{fastest}: {times[fastest] * 1e3:.1f}"
        torch.cuda.empty_cache()
    report.extra["fastest_forced_splits"] = best
    return best


def short_table(
    measured: list[tuple[tuple[int, int, int], Timings]], copy: float, fastest: dict[str, str] | None = None
) -> str:
    """One line per product: what ran, its splits of K, its time against fp32's, eager and replayed, and the
    replayed automatic choice's bandwidth in GB/s (A, B and C in fp32 read or written once: the bytes fp32
    moves; the fused path reads A and B twice) as a share of ``copy`` GB/s, the copy bandwidth of the run."""

    def against(ms: float | None, fp32_ms: float) -> str:
        return "-" if ms is None else f"{ms * 1e3:.1f} ({fp32_ms / ms:.2f}x)"

    rows = [
        [
            f"{m}x{k}x{n}",
            t.chosen,
            str(t.splits),
            f"{t.fp32 * 1e3:.1f}",
            against(t.auto, t.fp32),
            f"{t.fp32_graph * 1e3:.1f}",
            against(t.auto_graph, t.fp32_graph),
            against(t.unsplit_graph, t.fp32_graph),
            f"{_gbps(m, k, n, t.auto_graph):.0f} ({_gbps(m, k, n, t.auto_graph) / copy:.0%})",
        ]
        + ([fastest.get(f"{m}x{k}x{n}", "-")] if fastest is not None else [])
        for (m, k, n), t in measured
    ]
    header = ["M x K x N", "chosen", "K splits", "fp32 us", "automatic us", "fp32 graph us", "automatic graph us"]
    header += ["unsplit fused graph us", "automatic graph GB/s (of copy)"]
    return markdown_table(header + (["fastest forced split: graph us"] if fastest is not None else []), rows)


def _gbps(m: int, k: int, n: int, ms: float) -> float:
    return 4.0 * (m * k + k * n + m * n) / (ms * 1e-3) / 1e9


def recommended_threshold(measured: list[tuple[tuple[int, int, int], Timings]]) -> int:
    """The largest M*N*K up to which the fused path is never more than 2% slower than cuBLAS (0: nowhere)."""
    best = 0
    for mnk, t in sorted((math.prod(shape), t) for shape, t in measured):
        if t.fused > t.scaled * SLOWER_ALLOWED:
            break
        best = mnk
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SQUARES)), help="square sizes, comma-separated")
    parser.add_argument("--no-skinny", action="store_true", help="leave out the skinny shapes")
    parser.add_argument("--split-k", action="store_true", help="only the products that split K (ignores --sizes)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: results/<gpu>/...)")
    args = parser.parse_args(argv)
    if args.split_k:
        shapes = list(SPLIT_K)
    else:
        shapes = [(s, s, s) for s in map(int, args.sizes.split(","))]
        shapes += [] if args.no_skinny else list(SKINNY)
    torch.backends.cuda.matmul.allow_tf32 = False  # the baseline and the reference are true fp32
    report = Report("tensorcore-fused-split-k" if args.split_k else "tensorcore-fused")
    out = args.out or Path.cwd() / "benchmarks" / "results" / device_slug() / report.component
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    progress(f"correctness on {len(shapes)} shapes x {len(SCALES)} scalings")
    check_correctness(report, shapes, device)
    if gpu:
        progress("timing")
        measured = time_paths(report, shapes, device)
        copy = copy_gbps()
        report.add(Row("copy", "device-to-device copy (read + write)", copy, "GB/s"))
        if args.split_k:  # small products only: no crossover with cuBLAS to find
            progress("forced splits of K")
            fastest = sweep_splits(report, shapes, device)
            status = report.finish(out)
            table = short_table(measured, copy, fastest)
            with (out / "summary.md").open("a", encoding="utf-8") as summary:
                summary.write(f"\n{table}\n")
            print(f"\n{table}")
            return status
        crossover = recommended_threshold(measured)
        log2 = f"2^{math.log2(crossover):.2f}" if crossover else "none"
        report.extra["recommended_max_mnk"] = crossover
        report.extra["current_max_mnk"] = FUSED_MATMUL_MAX_MNK
        report.add(
            Row(
                "threshold",
                f"recommended FUSED_MATMUL_MAX_MNK (now 2^{FUSED_MATMUL_MAX_MNK.bit_length() - 1})",
                float(crossover),
                "M*N*K",
                note=f"{log2}: fused within {SLOWER_ALLOWED - 1:.0%} of cuBLAS up to here",
            )
        )
        status = report.finish(out)
        table = short_table(measured, copy)
        with (out / "summary.md").open("a", encoding="utf-8") as summary:
            summary.write(f"\n{table}\n")
        print(f"\n{table}")
        return status
    progress("no GPU: correctness checked (in the interpreter), timing skipped")
    return report.finish(out)


if __name__ == "__main__":
    sys.exit(main())
