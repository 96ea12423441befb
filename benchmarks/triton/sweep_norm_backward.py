"""The norm backward on one GPU: correctness against PyTorch's autograd, then its time beside PyTorch eager and
``torch.compile``, and a sweep of launch configurations of rows too long to hold in registers.

Usage (from the repository root; no network, no installs; a few minutes on an H100/H200, most of it compiling):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/triton/sweep_norm_backward.py

For each operation (``--ops``: RMSNorm and LayerNorm by default; ``fused_add_rmsnorm``, ``fused_add_layernorm``
on request), shape (``--shapes``: 4096x4096, 16384x8192, 4096x16384) and dtype (``--dtypes``: fp16, bf16):

1. Correctness: the gradients of every input (x, the residual, weight, bias) from the library's autograd, and
   from each swept launch, against PyTorch's autograd of the fp32 reference on the same inputs, scored as the
   largest ``|got - want| / (atol + rtol |want|)`` with the shared tolerance of the dtype (1.0 is the edge).
   A case passes at or under 1.0, or under twice PyTorch eager's own score in that dtype.
2. Timing (``llamatelemetry_core.testing.bench.gpu_ms``: median, L2 flushed, replayed from a CUDA graph, so GPU time
   alone; a call that cannot be captured is timed eagerly and says so): the backward alone, as
   ``torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True)`` after one forward made on a side stream
   (autograd runs the backward there, where the graph captures it), for the library, PyTorch eager (``F.rms_norm`` /
   ``F.layer_norm``) and ``torch.compile`` of the library's reference; then the library's backward launcher called
   directly with each swept launch. Where rows are read twice (2-byte rows of 8193-16384 elements) the sweep covers
   8, 16 and 32 warps (``--warps``), the first read (the row's two sums) in blocks of 2048 or 4096, unrolled or
   looped, and for comparison the row held in registers (which spills) and the row looped over in blocks of 4096
   (the path before). GB/s count each input read once and each output written once; the ceiling is ``copy_gbps``
   measured in the same run.

Writes ``results.json`` and ``summary.md`` under ``benchmarks/results/<gpu-slug>/triton-norm-backward`` and prints
a short table last (one line per case). Exit status 1 when a gradient is wrong, or when the library's backward
is slower than ``torch.compile``'s. Without a GPU (``TRITON_INTERPRET=1``) it checks correctness alone in the
interpreter, in fp16, at the ``--shapes`` given (tiny: ``--shapes 2x8208``): a smoke test of the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llamatelemetry_core.selection import record_selections
from llamatelemetry_core.testing import tolerance_for
from llamatelemetry_core.testing.bench import Report, Row, copy_gbps, gpu_ms, markdown_table, progress
from llamatelemetry_triton import (
    fused_add_layernorm_reference,
    fused_add_rmsnorm_reference,
    layernorm_reference,
    rmsnorm_reference,
    triton_fused_add_layernorm,
    triton_fused_add_rmsnorm,
    triton_layernorm,
    triton_rmsnorm,
)
from llamatelemetry_triton._dispatch import device_info
from llamatelemetry_triton.heuristics import NORM_LOOP_BLOCK, LaunchConfig, norm_config
from llamatelemetry_triton.ops._norm_backward import _norm_backward
from llamatelemetry_triton.ops.norm import _norm_forward

SHAPES = "4096x4096,16384x8192,4096x16384"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
WARPS = "8,16,32"
EPS = 1e-5

Fn = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Op:
    """One norm: the library's function, PyTorch eager's, the fp32 reference, and its flags."""

    ours: Fn
    eager: Fn
    reference: Fn
    is_rms: bool
    residual: bool
    bias: bool


def _eager_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def _eager_ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _eager_add_rms(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + r
    return _eager_rms(h, w, eps), h


def _eager_add_ln(
    x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + r
    return _eager_ln(h, w, b, eps), h


OPS = {
    "rmsnorm": Op(triton_rmsnorm, _eager_rms, rmsnorm_reference, True, False, False),
    "layernorm": Op(triton_layernorm, _eager_ln, layernorm_reference, False, False, True),
    "fused_add_rmsnorm": Op(triton_fused_add_rmsnorm, _eager_add_rms, fused_add_rmsnorm_reference, True, True, False),
    "fused_add_layernorm": Op(
        triton_fused_add_layernorm, _eager_add_ln, fused_add_layernorm_reference, False, True, True
    ),
}


def _with_eps(fn: Fn) -> Fn:
    """``fn`` with the sweep's eps (every function here takes it last, by name)."""
    return lambda *t: fn(*t, eps=EPS)


def _inputs(op: Op, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(rows * 31 + cols)

    def make(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device) * scale + shift).to(dtype)

    inputs = [make(rows, cols, scale=2.0, shift=0.5)]
    if op.residual:
        inputs.append(make(rows, cols))
    inputs.append(make(cols, scale=0.5, shift=1.0))
    if op.bias:
        inputs.append(make(cols, scale=0.5))
    return inputs


@dataclass
class Training:
    """One forward of a function on leaf copies of the inputs, made on ``stream`` (a side stream on a GPU: autograd
    runs a backward on its forward's stream, and a CUDA graph can capture there); ``backward`` computes the
    gradients of the inputs again (``retain_graph``) for cotangents rounded to the dtype, the same for every
    function; ``grads`` are those gradients."""

    backward: Callable[[], object]
    grads: list[torch.Tensor]
    stream: torch.cuda.Stream | None


def _training(fn: Fn, inputs: Sequence[torch.Tensor], dtype: torch.dtype) -> Training:
    device = inputs[0].device
    stream = torch.cuda.Stream() if device.type == "cuda" else None  # type: ignore[no-untyped-call]
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        outs = list(out) if isinstance(out, tuple) else [out]
        gen = torch.Generator(device=device).manual_seed(1)
        cotangents = [torch.randn(o.shape, generator=gen, device=device).to(dtype).to(o.dtype) for o in outs]

        def backward() -> tuple[torch.Tensor, ...]:
            return torch.autograd.grad(outs, leaves, cotangents, retain_graph=True)

        grads = [g.detach() for g in backward()]
    if stream is not None:
        torch.cuda.current_stream().wait_stream(stream)
    return Training(backward, grads, stream)


def _score(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest ``|got - want| / (atol + rtol |want|)`` (1.0: at the edge of the shared tolerance of ``dtype``)."""
    tol = tolerance_for(dtype)
    want64 = want.double()
    return float(((got.double() - want64).abs() / (tol.atol + tol.rtol * want64.abs())).max())


def _timed(fn: Callable[[], object], stream: torch.cuda.Stream | None = None) -> tuple[float | None, str]:
    """GPU ms of ``fn`` replayed from a CUDA graph captured on ``stream`` (or a side stream of its own); timed
    eagerly where it cannot be captured (the note says so); ``None`` where it fails."""
    with torch.cuda.stream(stream):
        try:
            return gpu_ms(fn, graph=True), ""
        except Exception as exc:  # a baseline that cannot be captured (torch.compile, say) is timed eagerly
            try:
                return gpu_ms(fn), f"eager calls ({type(exc).__name__} in capture)"
            except Exception as again:
                return None, f"failed: {type(again).__name__}: {again}"[:200]


def _backward_ms(
    report: Report,
    group: str,
    name: str,
    training: Training,
    eager_ms: float | None,
    note: Callable[[float | None, str], str],
) -> float | None:
    """Adds the row of one implementation's backward and returns its ms (``None`` where timing failed)."""
    ms, how = _timed(training.backward, training.stream)
    baseline = None if name == "PyTorch eager" else eager_ms
    report.add(Row(group, f"{name} backward", ms or float("nan"), "ms", baseline, "eager", note(ms, how)))
    return ms


def _sweep(config: LaunchConfig, warps: Sequence[int]) -> dict[str, LaunchConfig]:
    """The launches to compare with ``config`` (the one chosen): where it reads rows twice, its warps, its first
    read unrolled or looped, the row held in registers instead, and the row looped over (the path before)."""
    if not config.reread_row:
        return {"chosen": config}

    def label(c: LaunchConfig) -> str:
        sums = f"sums in {c.chunk_size}s {'unrolled' if c.unrolled else 'looped'}"
        return f"read twice, {sums}, {c.num_warps} warps"

    def first_read(chunk: int, unrolled: bool) -> LaunchConfig:
        return dataclasses.replace(config, chunk_size=chunk, unrolled=config.block_size // chunk if unrolled else 0)

    swept = [dataclasses.replace(config, num_warps=w) for w in warps]
    swept += [first_read(chunk, unrolled) for chunk in (2048, 4096) for unrolled in (False, True)]
    launches = {label(c): c for c in swept}
    launches["held (spills), 16 warps"] = dataclasses.replace(config, num_warps=16, reread_row=False, unrolled=0)
    looped = LaunchConfig(NORM_LOOP_BLOCK, 16, 2, single_block=False)
    launches[f"looped, {looped.block_size} blocks (before)"] = looped
    return launches


@dataclass
class Case:
    """The summary of one (op, dtype, shape): its one line of the short table."""

    name: str
    ours: float | None = None
    eager: float | None = None
    compiled: float | None = None
    launcher: float | None = None
    pct: float | None = None
    best: str = "-"
    score: float = 0.0


def run_case(
    report: Report, op_name: str, dtype: torch.dtype, rows: int, cols: int, warps: Sequence[int], copy: float | None
) -> Case:
    op = OPS[op_name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    group = f"{op_name} {str(dtype).removeprefix('torch.')} {rows}x{cols}"
    case = Case(group)
    inputs = _inputs(op, rows, cols, dtype, device)
    want = _training(_with_eps(op.reference), [t.float() for t in inputs], dtype).grads
    with record_selections() as rec:
        ours = _training(_with_eps(op.ours), inputs, dtype)
    ran = rec.last(op_name)
    report.check(f"{group}: the library ran its Triton kernels ({ran})", float(ran == "triton"), 1.0)
    eager = _training(_with_eps(op.eager), inputs, dtype)
    eager_score = max(_score(g, w, dtype) for g, w in zip(eager.grads, want, strict=True))
    limit = max(1.0, 2.0 * eager_score)
    case.score = max(_score(g, w, dtype) for g, w in zip(ours.grads, want, strict=True))
    report.check(f"{group}: gradients (score vs PyTorch eager's {eager_score:.2f})", case.score, limit, at_most=True)

    # The launcher alone, on the forward's statistics, for each swept launch.
    x, residual = inputs[0], (inputs[1] if op.residual else None)
    weight, bias = inputs[1 + op.residual], (inputs[-1] if op.bias else None)
    _, h, mean, rstd = _norm_forward(x, residual, weight, bias, EPS, op.is_rms)
    normed = h if h is not None else x
    gen = torch.Generator(device=device).manual_seed(1)
    dy = torch.randn(x.shape, generator=gen, device=device).to(dtype)
    dres = torch.randn(x.shape, generator=gen, device=device).to(normed.dtype) if op.residual else None
    assert rstd is not None
    chosen = norm_config(cols, dtype, device_info(device), backward=True, layernorm=not op.is_rms)
    launches = _sweep(chosen, warps)
    # Each launch's dx against the chosen one's (the same arithmetic, another reduction order).
    base = _norm_backward(dy, normed, dres, weight, mean, rstd, op.is_rms, op.bias, config=chosen)
    for label, config in launches.items():
        if config == chosen:
            continue
        other = _norm_backward(dy, normed, dres, weight, mean, rstd, op.is_rms, op.bias, config=config)
        score = max(_score(a, b, dtype) for a, b in zip(other, base, strict=True) if a is not None and b is not None)
        report.check(f"{group}: {label} agrees with the chosen launch", score, 1.0, at_most=True)
    if device.type != "cuda":
        return case

    n_bytes = (3 + op.residual) * x.numel() * x.element_size()  # x (or h), dy (and dres) read; dx written

    def note(ms: float | None, extra: str = "") -> str:
        if ms is None or copy is None:
            return extra
        gbps = n_bytes / ms / 1e6
        return f"{gbps:.0f} GB/s, {100 * gbps / copy:.1f}% of copy" + (f"; {extra}" if extra else "")

    case.eager = _backward_ms(report, group, "PyTorch eager", eager, None, note)
    try:
        compiled = _training(torch.compile(_with_eps(op.reference), dynamic=False), inputs, dtype)
    except Exception as exc:  # reported, not fatal
        report.add(Row(group, "torch.compile", float("nan"), "ms", note=f"failed: {type(exc).__name__}: {exc}"[:200]))
    else:
        case.compiled = _backward_ms(report, group, "torch.compile", compiled, case.eager, note)
    case.ours = _backward_ms(report, group, "llamatelemetry", ours, case.eager, note)
    if case.ours is not None and case.compiled is not None:
        report.add(Row(group, "llamatelemetry backward", case.ours, "ms", case.compiled, "torch.compile backward"))
        report.check(f"{group}: backward >= 1.0x torch.compile", case.compiled / case.ours, 1.0)
    best_ms = float("inf")
    for label, config in launches.items():
        launch = functools.partial(_norm_backward, dy, normed, dres, weight, mean, rstd, op.is_rms, op.bias)
        ms, how = _timed(functools.partial(launch, config=config))
        name = f"launcher: {label}" + (" (chosen)" if config == chosen else "")
        report.add(Row(group, name, ms or float("nan"), "ms", case.eager, "eager", note(ms, how)))
        if ms is not None and ms < best_ms:
            best_ms, case.best = ms, label
        if config == chosen:
            case.launcher = ms
    if case.launcher is not None and copy is not None:
        case.pct = 100 * n_bytes / case.launcher / 1e6 / copy
    return case


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def summary(cases: list[Case]) -> str:
    rows = []
    for c in cases:
        vs_eager = None if c.ours is None or c.eager is None else c.eager / c.ours
        vs_compile = None if c.ours is None or c.compiled is None else c.compiled / c.ours
        ratios = [_fmt(c.ours), _fmt(c.eager), _fmt(c.compiled), _fmt(vs_eager, ".2f"), _fmt(vs_compile, ".2f")]
        rows.append([c.name, *ratios, _fmt(c.launcher), _fmt(c.pct, ".1f"), c.best, f"{c.score:.2f}"])
    header = ["case", "ours ms", "eager ms", "compile ms", "vs eager", "vs compile", "launcher ms", "% copy"]
    header += ["fastest launch", "err"]
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="rmsnorm,layernorm", help=f"comma-separated, of {', '.join(OPS)}")
    parser.add_argument("--shapes", default=SHAPES, help="rows x columns, comma-separated")
    parser.add_argument("--dtypes", default="fp16,bf16", help="comma-separated, of fp16, bf16")
    parser.add_argument("--warps", default=WARPS, help="warps of the swept read-twice launches")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: results/<gpu>/...)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    torch._functorch.config.donated_buffer = False  # the compiled backward runs again (retain_graph)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",") if gpu or d == "fp16"]  # NumPy has no bfloat16
    warps = [int(w) for w in args.warps.split(",")]
    report = Report("triton-norm-backward")
    copy = copy_gbps() if gpu else None
    if copy is not None:
        report.add(Row("copy", "device-to-device copy (ceiling)", copy, "GB/s"))
    cases = []
    for op_name in args.ops.split(","):
        for dtype in dtypes:
            for rows, cols in shapes:
                progress(f"{op_name} {dtype} {rows}x{cols}")
                cases.append(run_case(report, op_name, dtype, rows, cols, warps, copy))
                if gpu:
                    torch.cuda.empty_cache()
    if not gpu:
        progress("no GPU: correctness checked (in the interpreter), timing skipped")
    status = report.finish(args.out)
    print()
    print(summary(cases))
    return status


if __name__ == "__main__":
    sys.exit(main())
