"""The few-row linear kernels on one GPU: correctness, then a sweep of launch configurations against cuBLAS.

Usage (from the repository root; no network, no installs; about eight minutes on an H200, most of it compiling
228 launches; ``--rows 1,2`` then ``--rows 4,8 --out DIR`` halves each run, ``--warps 4 --stages 3`` narrows it):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/triton/sweep_gemv.py

For each decode projection of Llama-3.2-1B (``--shapes``: q/k/v merged 3072x2048, o 2048x2048, gate/up merged
16384x2048, down 2048x8192, as ``name=NxK``), row count (``--rows``: 1, 2, 4, 8) and dtype (``--dtypes``: fp16):

1. Correctness: ``triton_linear`` and, for the projections that follow a norm (q/k/v, gate/up),
   ``triton_fused_add_rmsnorm_linear``, against their references (``F.linear``; the fused norm then ``F.linear``)
   scored as the largest ``|got - want| / (atol + rtol |want|)`` with the shared tolerance of the dtype (1.0 is the
   edge); every swept launch against the chosen one.
2. Timing (``llamatelemetry_core.testing.bench.gpu_ms``: median, L2 flushed, replayed from a CUDA graph): each call
   is made once per layer on ``--layers`` (16) distinct weights, as a decode step makes them, so the weights come
   from device memory; the time per call is the total over the layers. Baselines of the same run: cuBLAS
   (``F.linear``), and for the fused projections the unfused pair (``triton_fused_add_rmsnorm`` then
   ``F.linear``, what the engine runs). Then the plain kernel with every launch of the sweep (``BLOCK_N``
   2-32, ``BLOCK_K`` 256-1024, 4 or 8 warps, 2-4 stages, tiles of at most 16384 elements, 32768 for one row),
   and the fused kernel with the chosen launch and with the plain sweep's fastest; for gate/up also the SwiGLU
   epilogue (``swiglu=True``) against norm + ``F.linear`` + ``triton_swiglu``. GB/s count the weight's bytes;
   the ceiling is ``copy_gbps`` measured in the same run.

Writes ``results.json`` (every swept launch's time under ``extra``) and ``summary.md`` under
``benchmarks/results/<gpu-slug>/triton-gemv``; prints the fastest launch per shape (the row to write into
``LINEAR_TABLES`` of ``llamatelemetry_triton.heuristics``) and a short table last. Exit status 1 when a result is
wrong. Without a GPU (``TRITON_INTERPRET=1``) it checks correctness alone in the interpreter at the ``--shapes``
given (tiny: ``--shapes gate_up=40x48,down=24x72 --rows 1,3``), and runs every timed call once, untimed: a smoke
test of the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llamatelemetry_core.selection import record_selections
from llamatelemetry_core.testing import tolerance_for
from llamatelemetry_core.testing.bench import Report, Row, copy_gbps, gpu_ms, markdown_table, progress
from llamatelemetry_triton import (
    fused_add_rmsnorm_linear_reference,
    triton_fused_add_rmsnorm,
    triton_fused_add_rmsnorm_linear,
    triton_linear,
    triton_swiglu,
)
from llamatelemetry_triton._dispatch import device_info
from llamatelemetry_triton.heuristics import LaunchConfig, linear_config
from llamatelemetry_triton.ops._linear_kernel import linear_forward

SHAPES = "qkv=3072x2048,o=2048x2048,gate_up=16384x2048,down=2048x8192"
FUSED = ("qkv", "gate_up")  # the projections that follow a norm
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
EPS = 1e-5


def _score(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest ``|got - want| / (atol + rtol |want|)`` (1.0: at the edge of the shared tolerance of ``dtype``)."""
    tol = tolerance_for(dtype)
    want64 = want.double()
    return float(((got.double() - want64).abs() / (tol.atol + tol.rtol * want64.abs())).max())


def sweep_configs(rows: int, warps: Sequence[int] = (4, 8), stages: Sequence[int] = (2, 3, 4)) -> list[LaunchConfig]:
    """The launches swept at ``rows`` rows: BLOCK_N 2-32, BLOCK_K 256-1024, tiles bounded so the registers hold them."""
    block_m = 1 << (rows - 1).bit_length()
    bound = 32768 if rows == 1 else 16384
    configs = []
    for block_n in (2, 4, 8, 16, 32):
        for block_k in (256, 512, 1024):
            if block_n * block_k < 1024 or block_m * block_n * block_k > bound:
                continue
            for w in warps:
                for st in stages:
                    configs.append(LaunchConfig(block_n, w, st, single_block=False, chunk_size=block_k))
    return configs


def label(config: LaunchConfig) -> str:
    return (
        f"BLOCK_N={config.block_size} BLOCK_K={config.chunk_size} warps={config.num_warps} stages={config.num_stages}"
    )


@dataclass
class Case:
    """One (shape, rows, dtype): its line of the short table."""

    name: str
    n: int
    k: int
    rows: int
    cublas_us: float | None = None
    chosen_us: float | None = None
    best_us: float | None = None
    best: str = "-"
    unfused_us: float | None = None
    fused_us: float | None = None
    fused_best_us: float | None = None
    glu_unfused_us: float | None = None
    glu_fused_us: float | None = None
    score: float = 0.0
    swept: dict[str, float] = field(default_factory=dict)


def _glu_unfused(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, w: torch.Tensor) -> None:
    triton_swiglu(F.linear(triton_fused_add_rmsnorm(x, residual, norm_weight, EPS)[0], w))


def _each(launch: Callable[..., object], weights: list[torch.Tensor]) -> None:
    for w in weights:
        launch(w)


def _per_call_us(fn: Callable[[], object], layers: int) -> float | None:
    """GPU microseconds per call of ``fn`` (``layers`` calls), replayed from a CUDA graph; ``None`` where it fails
    (reported). Without a GPU ``fn`` runs once, untimed, and errors propagate: the script's smoke test."""
    if not torch.cuda.is_available():
        fn()
        return None
    try:
        return gpu_ms(fn, graph=True, reps=30) * 1e3 / layers
    except Exception as exc:  # a launch that does not compile or fit: reported, not fatal
        progress(f"  failed: {type(exc).__name__}: {str(exc)[:160]}")
        return None


def run_case(
    report: Report,
    name: str,
    n: int,
    k: int,
    rows: int,
    dtype: torch.dtype,
    layers: int,
    copy: float | None,
    swept: Callable[[int], list[LaunchConfig]] = sweep_configs,
) -> Case:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    group = f"{name} {n}x{k} M={rows} {str(dtype).removeprefix('torch.')}"
    case = Case(group, n, k, rows)
    gen = torch.Generator(device=device).manual_seed(n + k + rows)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)

    weights = [randn(n, k, scale=k**-0.5) for _ in range(layers)]
    x, residual = randn(rows, k), randn(rows, k)
    norm_weight = (torch.rand(k, generator=gen, device=device) + 0.5).to(dtype)
    fused = name in FUSED

    # Correctness: the public calls (which must choose the kernel), then every swept launch against the chosen one.
    with record_selections() as rec:
        y = triton_linear(x, weights[0])
        y_fused, h = triton_fused_add_rmsnorm_linear(x, residual, norm_weight, weights[0], eps=EPS)
    ran = {rec.last("triton.linear"), rec.last("triton.fused_add_rmsnorm_linear")}
    report.check(
        f"{group}: the library ran its Triton kernels ({sorted(map(str, ran))})", float(ran == {"triton"}), 1.0
    )
    want_y, want_h = fused_add_rmsnorm_linear_reference(x, residual, norm_weight, weights[0], eps=EPS)
    scores = [_score(y, F.linear(x.float(), weights[0].float()), dtype), _score(y_fused, want_y, dtype)]
    scores.append(_score(h, want_h, dtype))
    if n % 2 == 0:  # the SwiGLU epilogue, against the reference's projection then SwiGLU
        y_glu, _ = triton_fused_add_rmsnorm_linear(x, residual, norm_weight, weights[0], eps=EPS, swiglu=True)
        want_glu, _ = fused_add_rmsnorm_linear_reference(x, residual, norm_weight, weights[0], eps=EPS, swiglu=True)
        scores.append(_score(y_glu, want_glu, dtype))
    case.score = max(scores)
    report.check(f"{group}: results within the dtype's tolerance", case.score, 1.0, at_most=True)
    chosen = linear_config(rows, n, k, dtype, device_info(device))
    configs = swept(rows) if device.type == "cuda" else [dataclasses.replace(chosen, chunk_size=16)]
    worst = 0.0
    for config in configs:
        got, _ = linear_forward(x, None, None, weights[0], None, 0.0, config=config)
        worst = max(worst, _score(got, y, dtype))
    report.check(f"{group}: every swept launch agrees with the chosen one", worst, 1.0, at_most=True)
    n_bytes = n * k * weights[0].element_size()

    def note(us: float | None) -> str:
        if us is None or copy is None:
            return ""
        gbps = n_bytes / us / 1e3
        return f"{gbps:.0f} GB/s of weights, {100 * gbps / copy:.0f}% of copy"

    def add(case_name: str, us: float | None, baseline: float | None, baseline_name: str | None) -> None:
        if device.type != "cuda":
            return  # the smoke test runs the calls untimed: nothing to report
        report.add(
            Row(group, case_name, us if us is not None else float("nan"), "us", baseline, baseline_name, note(us))
        )

    out = torch.empty(rows, n, dtype=dtype, device=device)
    case.cublas_us = _per_call_us(lambda: [torch.matmul(x, w.t(), out=out) for w in weights], layers)
    add("cuBLAS F.linear", case.cublas_us, None, None)
    case.chosen_us = _per_call_us(lambda: [triton_linear(x, w) for w in weights], layers)
    add(f"triton_linear, chosen ({label(chosen)})", case.chosen_us, case.cublas_us, "cuBLAS")
    best_config = chosen
    for config in configs:  # (on CPU, the one launch checked above, run untimed)
        launch = functools.partial(linear_forward, x, None, None, bias=None, eps=0.0, config=config)
        us = _per_call_us(functools.partial(_each, launch, weights), layers)
        if us is None:
            continue
        case.swept[label(config)] = us
        if case.best_us is None or us < case.best_us:
            case.best_us, case.best, best_config = us, label(config), config
    add(f"triton_linear, fastest ({case.best})", case.best_us, case.cublas_us, "cuBLAS")
    if fused:
        case.unfused_us = _per_call_us(
            lambda: [F.linear(triton_fused_add_rmsnorm(x, residual, norm_weight, EPS)[0], w) for w in weights], layers
        )
        add("unfused: triton_fused_add_rmsnorm + F.linear", case.unfused_us, None, None)
        case.fused_us = _per_call_us(
            lambda: [triton_fused_add_rmsnorm_linear(x, residual, norm_weight, w, eps=EPS) for w in weights], layers
        )
        add("triton_fused_add_rmsnorm_linear, chosen", case.fused_us, case.unfused_us, "unfused pair")
        fused_launch = functools.partial(
            linear_forward, x, residual, norm_weight, bias=None, eps=EPS, config=best_config
        )
        case.fused_best_us = _per_call_us(functools.partial(_each, fused_launch, weights), layers)
        add(f"fused, plain sweep's fastest ({case.best})", case.fused_best_us, case.unfused_us, "unfused pair")
    if name == "gate_up":
        case.glu_unfused_us = _per_call_us(
            functools.partial(_each, functools.partial(_glu_unfused, x, residual, norm_weight), weights), layers
        )
        add("unfused: triton_fused_add_rmsnorm + F.linear + triton_swiglu", case.glu_unfused_us, None, None)
        glu = functools.partial(triton_fused_add_rmsnorm_linear, x, residual, norm_weight, eps=EPS, swiglu=True)
        case.glu_fused_us = _per_call_us(functools.partial(_each, glu, weights), layers)
        add(
            "triton_fused_add_rmsnorm_linear(swiglu=True), chosen",
            case.glu_fused_us,
            case.glu_unfused_us,
            "unfused triple",
        )
    return case


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def summary(cases: list[Case]) -> str:
    rows = []
    for c in cases:
        ratio = None if c.cublas_us is None or c.best_us is None else c.cublas_us / c.best_us
        fused_ratio = None if c.unfused_us is None or c.fused_best_us is None else c.unfused_us / c.fused_best_us
        timings = [_fmt(c.cublas_us), _fmt(c.chosen_us), _fmt(c.best_us), _fmt(ratio), c.best]
        fused = [_fmt(c.unfused_us), _fmt(c.fused_us), _fmt(c.fused_best_us), _fmt(fused_ratio)]
        fused += [_fmt(c.glu_unfused_us), _fmt(c.glu_fused_us)]
        rows.append([c.name, *timings, *fused, f"{c.score:.2f}"])
    header = ["case", "cuBLAS us", "chosen us", "fastest us", "vs cuBLAS", "fastest launch"]
    header += ["norm+cuBLAS us", "fused us", "fused fastest us", "vs unfused", "+SwiGLU unfused us", "+SwiGLU fused us"]
    header += ["err"]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=SHAPES, help="name=NxK, comma-separated (q/k/v: qkv, gate/up: gate_up)")
    parser.add_argument("--rows", default="1,2,4,8", help="rows (tokens), comma-separated, each <= 8")
    parser.add_argument("--dtypes", default="fp16", help="comma-separated, of fp16, bf16")
    parser.add_argument("--layers", type=int, default=16, help="distinct weights per timed call (a decode step's)")
    parser.add_argument("--warps", default="4,8", help="warps of the swept launches, comma-separated")
    parser.add_argument("--stages", default="2,3,4", help="pipeline stages of the swept launches, comma-separated")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: results/<gpu>/triton-gemv)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    shapes = [(s.split("=")[0], *map(int, s.split("=")[1].split("x"))) for s in args.shapes.split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",") if gpu or d == "fp16"]  # NumPy has no bfloat16
    warps = [int(w) for w in args.warps.split(",")]
    stages = [int(st) for st in args.stages.split(",")]
    swept = functools.partial(sweep_configs, warps=warps, stages=stages)
    report = Report("triton-gemv")
    copy = copy_gbps() if gpu else None
    if copy is not None:
        report.add(Row("copy", "device-to-device copy (ceiling)", copy, "GB/s"))
    cases = []
    for dtype in dtypes:
        for rows in (int(r) for r in args.rows.split(",")):
            for name, n, k in shapes:
                progress(f"{name} {n}x{k} M={rows} {dtype}")
                cases.append(run_case(report, name, n, k, rows, dtype, args.layers if gpu else 1, copy, swept))
                if gpu:
                    torch.cuda.empty_cache()
    report.extra["swept_us"] = {c.name: c.swept for c in cases}
    report.extra["fastest"] = {c.name: c.best for c in cases}
    if not gpu:
        progress("no GPU: correctness checked (in the interpreter), timing skipped")
    status = report.finish(args.out)
    print()
    for c in cases:
        print(f"fastest launch: {c.name}: {c.best}" + (f" ({c.best_us:.2f} us)" if c.best_us is not None else ""))
    print()
    print(summary(cases))
    return status


if __name__ == "__main__":
    sys.exit(main())
