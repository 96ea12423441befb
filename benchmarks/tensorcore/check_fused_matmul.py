"""The fused ``matmul_tensor_core`` path on a GPU: correctness against the reference, then its speed, and the
crossover that ``FUSED_MATMUL_MAX_MNK`` should hold.

Usage (from the repository root; no network, no installs; under two minutes on an H100/H200):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/tensorcore/check_fused_matmul.py

1. Correctness: for square products 64..8192 and skinny ones (decode ``1 x 4096 x 4096``, ``128 x 4096 x 11008``
   and more), fp32 inputs at ordinary scale, far outside fp16's range both ways, and with inf/NaN: the fused
   path (launched directly, whatever the threshold) against the reference (``backend="reference"``: fp32
   products of the rounded inputs, TF32 off). Non-finite elements must match exactly; finite ones may differ by
   the fp16 rounding of a differently ordered fp32 sum: ``|fused - ref| <= 2^-10 |ref| + 2 K 2^-24 (|A| @ |B|)``.
2. Timing (``llamatelemetry_core.testing.bench.gpu_ms``: median, L2 flushed, eager launches): fp32
   ``torch.matmul`` with TF32 off (the baseline), the cuBLAS range-scaled path (``backend="tensor_core"``), the
   fused path (its launcher called directly, so that it runs above the threshold too) and the automatic choice;
   then the automatic choice and fp32 replayed from CUDA graphs (GPU time without the host's share).
3. The recommended threshold: the largest measured ``batch*M*N*K`` up to which the fused path is never more
   than 2% slower than the cuBLAS path, against ``FUSED_MATMUL_MAX_MNK`` as set.

Writes ``results.json`` and ``summary.md`` under ``benchmarks/results/<gpu-slug>/tensorcore-fused`` and prints the
table last. Exit status 1 when a product is wrong, or the automatic choice is slower than fp32 at some size.
Without a GPU (``TRITON_INTERPRET=1``) it checks correctness in the interpreter at the ``--sizes`` given (tiny)
and skips the timing: a smoke test of the script.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from llamatelemetry_core import record_selections
from llamatelemetry_core.testing.bench import Report, Row, gpu_ms, progress
from llamatelemetry_tensorcore import matmul_tensor_core
from llamatelemetry_tensorcore._fused_kernels import fused_matmul
from llamatelemetry_tensorcore.fused_matmul import FUSED_MATMUL_MAX_MNK, one_launch

SQUARES = (64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
SKINNY: tuple[tuple[int, int, int], ...] = (
    (1, 4096, 4096),  # M, K, N: a decode step
    (16, 4096, 4096),
    (128, 4096, 4096),
    (128, 4096, 11008),
    (128, 11008, 4096),
    (512, 4096, 4096),
    (2048, 4096, 11008),
)
SCALES = {"ordinary": (1.0, 1.0), "beyond fp16": (1e6, 3e3), "tiny": (1e-20, 1e-12), "mixed": (1e30, 1e-30)}
SLOWER_ALLOWED = 1.02  # fused within 2% of cuBLAS still counts as winning (timing noise)


def _inputs(m: int, k: int, n: int, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(m, k, device=device, generator=gen), torch.randn(k, n, device=device, generator=gen)


def wrong_elements(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """(elements of the fused product outside the bound, largest |fused - ref| / bound) against the reference."""
    got = fused_matmul(a, b, None)
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
            bad, worst = wrong_elements(a, b)
            cases[f"{m}x{k}x{n} {label}"] = {"wrong_elements": bad, "worst_of_bound": worst}
            progress(f"correctness {m}x{k}x{n} {label}: {bad} wrong, worst {worst:.3g} of the bound")
    wrong = sum(int(c["wrong_elements"]) for c in cases.values())
    worst = max(c["worst_of_bound"] for c in cases.values())
    report.extra["correctness"] = cases
    note = f"{len(cases)} cases; worst |fused - ref| = {worst:.3g} of the bound"
    report.add(Row("correctness", "fused vs reference: elements beyond the bound", float(wrong), "elements", note=note))
    report.check("fused vs reference: elements beyond the bound", float(wrong), 0.0, at_most=True)


def _timed(fn: Callable[[], object]) -> float:
    return gpu_ms(fn, reps=20, warmup=3)


Timings = tuple[float, float, float, float, float, float, float | None, str]


def _time_shape(m: int, k: int, n: int, device: torch.device) -> Timings:
    """(fp32, cuBLAS range-scaled, fused, automatic) in ms for one shape, eagerly, then fp32 and the automatic
    choice replayed from CUDA graphs (GPU time alone, no host work), and the automatic choice's name."""
    a, b = _inputs(m, k, n, device, seed=1)
    fp32 = _timed(lambda: torch.matmul(a, b))
    scaled = _timed(lambda: matmul_tensor_core(a, b, backend="tensor_core"))
    fused = _timed(lambda: fused_matmul(a, b, None))
    # where one launch is chosen, the two-launch form beside it (FUSED_ONE_LAUNCH_MAX_ELEMENTS is a guess)
    two = _timed(lambda: fused_matmul(a, b, None, launches=2)) if one_launch(a.numel(), b.numel()) else None
    auto = _timed(lambda: matmul_tensor_core(a, b))
    fp32_graph = gpu_ms(lambda: torch.matmul(a, b), graph=True, reps=20, warmup=3)
    auto_graph = gpu_ms(lambda: matmul_tensor_core(a, b), graph=True, reps=20, warmup=3)
    with record_selections() as rec:
        matmul_tensor_core(a, b)
    return fp32, scaled, fused, auto, fp32_graph, auto_graph, two, rec.last("matmul_tensor_core") or "?"


def time_paths(
    report: Report, shapes: list[tuple[int, int, int]], device: torch.device
) -> list[tuple[int, float, float]]:
    """Time the four paths per shape; returns (M*N*K, fused ms, cuBLAS-scaled ms) per shape."""
    measured = []
    for m, k, n in shapes:
        fp32, scaled, fused, auto, fp32_graph, auto_graph, two, chosen = _time_shape(m, k, n, device)
        torch.cuda.empty_cache()
        name = f"{m}x{k}x{n}"
        tflop = 2.0 * m * n * k / 1e9  # TFLOP/s when divided by milliseconds
        report.add(Row(name, "fp32 torch.matmul (TF32 off)", fp32, "ms", note=f"{tflop / fp32:.1f} TFLOP/s"))
        report.add(Row(name, "tensor_core (cuBLAS, range-scaled)", scaled, "ms", fp32, "fp32"))
        launches = "one launch" if two is not None else "two launches"
        note = f"{tflop / fused:.1f} TFLOP/s"
        report.add(Row(name, f"fused, {launches} (forced)", fused, "ms", fp32, "fp32", note=note))
        if two is not None:
            report.add(Row(name, "fused, two launches (forced)", two, "ms", fp32, "fp32"))
        report.add(Row(name, f"automatic ({chosen})", auto, "ms", fp32, "fp32"))
        report.add(Row(name, f"automatic ({chosen}), graph replay", auto_graph, "ms", fp32_graph, "fp32, graph replay"))
        report.check(f"{name}: automatic choice >= 1.0x fp32", fp32 / auto, 1.0)
        measured.append((m * n * k, fused, scaled))
    return measured


def recommended_threshold(measured: list[tuple[int, float, float]]) -> int:
    """The largest M*N*K up to which the fused path is never more than 2% slower than cuBLAS (0: nowhere)."""
    best = 0
    for mnk, fused, scaled in sorted(measured):
        if fused > scaled * SLOWER_ALLOWED:
            break
        best = mnk
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SQUARES)), help="square sizes, comma-separated")
    parser.add_argument("--no-skinny", action="store_true", help="leave out the skinny shapes")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: results/<gpu>/...)")
    args = parser.parse_args(argv)
    shapes = [(s, s, s) for s in map(int, args.sizes.split(","))]
    if not args.no_skinny:
        shapes += list(SKINNY)
    torch.backends.cuda.matmul.allow_tf32 = False  # the baseline and the reference are true fp32
    report = Report("tensorcore-fused")
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    progress(f"correctness on {len(shapes)} shapes x {len(SCALES)} scalings")
    check_correctness(report, shapes, device)
    if gpu:
        progress("timing")
        measured = time_paths(report, shapes, device)
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
    else:
        progress("no GPU: correctness checked (in the interpreter), timing skipped")
    return report.finish(args.out)


if __name__ == "__main__":
    sys.exit(main())
