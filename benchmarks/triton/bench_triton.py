"""Benchmark of the llamatelemetry-triton kernels against PyTorch eager and torch.compile, on one GPU.

    PYTHONPATH=packages/llamatelemetry-core/src:packages/llamatelemetry-triton/src \\
        python benchmarks/triton/bench_triton.py        # --out DIR; default benchmarks/results/<gpu-slug>/triton

Each case is timed twice, both as medians of ``triton.testing.do_bench`` (which flushes L2 before every
repetition):

* GPU time: the call captured once in a CUDA graph and replayed, so the host's work per call (Python, dispatch,
  kernel launch) is excluded, as in a CUDA-graphed decode loop. Bandwidths and the targets use this time.
* eager time: the call made from Python each time. Where the host takes longer to issue a call than the GPU
  takes to run it (small shapes), this measures the host; it is reported beside the GPU time, never instead.

The ceiling is the device-to-device copy bandwidth measured in the same run at the same size (bytes read +
written once); memory-bound kernels are reported as GB/s and as a percentage of that copy. Baselines: PyTorch
eager and ``torch.compile`` of the same reference (a compile or capture failure is reported, not fatal).
Results: a JSON file (under ``benchmark`` the envelope every benchmark writes: schema, component, device
slug, environment and versions; beside it this benchmark's timings and checks) and a Markdown summary in
``--out``, progress on stderr, and a short table printed last. Exit status 1 when a target is missed. Takes
1-3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llamatelemetry_core.testing.bench import device_slug, do_bench_ms, envelope, progress

FP16 = torch.float16
SHAPES = [(4096, 4096), (16384, 8192), (4096, 16384)]
NORM_COPY_PCT = 95.0
"""Every norm at every shape in ``SHAPES``: at least this share of the copy bandwidth, and no slower than
torch.compile of its reference (equal within 0.5%, the resolution of the medians)."""
SMALL = (32, 768)
VOCAB = (32, 128256)


@dataclass
class Timing:
    case: str
    shape: str
    impl: str
    ms: float | None
    gbps: float | None = None
    pct_of_copy: float | None = None
    error: str | None = None
    eager_ms: float | None = None


@dataclass
class Check:
    target: str
    measured: str
    passed: bool | None


@dataclass
class Report:
    device: dict[str, Any]
    versions: dict[str, str]
    timings: list[Timing] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    max_errors: dict[str, float] = field(default_factory=dict)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, dynamic=False)


class Runner:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.copy_gbps: dict[str, float] = {}

    def time(self, case: str, shape: str, impl: str, fn: Callable[[], object], nbytes: int | None = None) -> Timing:
        progress(f"{case} {shape}: {impl}")
        errors = []
        try:
            eager_ms: float | None = do_bench_ms(fn)
        except Exception as exc:  # a baseline that fails (torch.compile, say) is reported, not fatal
            eager_ms = None
            errors.append(f"eager: {_error(exc)}")
            traceback.print_exc(limit=2, file=sys.stderr)
        ms: float | None = None
        if eager_ms is not None:
            try:
                ms = do_bench_ms(fn, graph=True)  # on the current side stream, where a backward runs
            except Exception as exc:
                errors.append(f"CUDA graph capture: {_error(exc)}")
                traceback.print_exc(limit=2, file=sys.stderr)
        gbps = pct = None
        if ms is not None and nbytes is not None:
            gbps = nbytes / (ms * 1e-3) / 1e9
            copy = self.copy_gbps.get(shape)
            pct = None if copy is None else 100.0 * gbps / copy
        timing = Timing(case, shape, impl, ms, gbps, pct, "; ".join(errors) or None, eager_ms)
        self.report.timings.append(timing)
        return timing

    def copy(self, shape: tuple[int, ...], dtype: torch.dtype = FP16) -> float:
        key = "x".join(map(str, shape))
        src = torch.randn(shape, device="cuda", dtype=dtype)
        dst = torch.empty_like(src)
        t = self.time(
            "copy (ceiling)", key, "torch copy_", lambda: dst.copy_(src), 2 * src.numel() * src.element_size()
        )
        assert t.gbps is not None
        self.copy_gbps[key] = t.gbps
        return t.gbps

    def check(self, target: str, measured: str, passed: bool | None) -> None:
        self.report.checks.append(Check(target, measured, passed))


def _ratio(slow: Timing, fast: Timing) -> float | None:
    """GPU-time speedup of ``fast`` over ``slow``."""
    return None if slow.ms is None or fast.ms is None else slow.ms / fast.ms


def _eager_ratio(slow: Timing, fast: Timing) -> float | None:
    """The same speedup for calls made eagerly from Python (host work included)."""
    return None if slow.eager_ms is None or fast.eager_ms is None else slow.eager_ms / fast.eager_ms


def _speedup(slow: Timing, fast: Timing) -> str:
    return f"{_fmt(_ratio(slow, fast))}x GPU time; eager calls {_fmt(_eager_ratio(slow, fast))}x"


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _max_error(report: Report, name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    report.max_errors[name] = float((got.float() - want.float()).abs().max())


def hf_rmsnorm_unfused(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> Any:
    """The residual add and Hugging Face's ``LlamaRMSNorm``, as PyTorch code runs them (several kernels)."""
    hidden = x + residual
    states = hidden.to(torch.float32)
    variance = states.pow(2).mean(-1, keepdim=True)
    states = states * torch.rsqrt(variance + eps)
    return weight * states.to(x.dtype), hidden


def _row_cases(r: Runner, report: Report, shape: tuple[int, int], compiled: dict[str, Callable[..., Any]]) -> None:
    """Forward (and LayerNorm backward) cases on one [rows, hidden] fp16 shape."""
    from llamatelemetry_triton import (
        layernorm_reference,
        rmsnorm_reference,
        softmax_reference,
        triton_add,
        triton_fused_add_rmsnorm,
        triton_layernorm,
        triton_rmsnorm,
        triton_softmax,
    )

    compiled_ln, compiled_rms, compiled_add = compiled["layernorm"], compiled["rmsnorm"], compiled["add"]
    compiled_softmax, compiled_fused = compiled["softmax"], compiled["fused"]
    key = "x".join(map(str, shape))
    n = shape[1]
    x = torch.randn(shape, device="cuda", dtype=FP16)
    res = torch.randn_like(x)
    w = torch.randn(n, device="cuda", dtype=FP16)
    b = torch.randn(n, device="cuda", dtype=FP16)
    io = 2 * x.numel() * 2  # one read of x, one write of y (fp16)

    _max_error(report, f"layernorm {key}", triton_layernorm(x, w, b), layernorm_reference(x, w, b))
    ln = r.time("layernorm", key, "triton", lambda: triton_layernorm(x, w, b), io)
    ln_eager = r.time("layernorm", key, "torch eager (F.layer_norm)", lambda: F.layer_norm(x, (n,), w, b), io)
    ln_comp = r.time("layernorm", key, "torch.compile(reference)", lambda: compiled_ln(x, w, b), io)

    _max_error(report, f"rmsnorm {key}", triton_rmsnorm(x, w), rmsnorm_reference(x, w))
    rms = r.time("rmsnorm", key, "triton", lambda: triton_rmsnorm(x, w), io)
    rms_eager = r.time("rmsnorm", key, "torch eager (reference)", lambda: rmsnorm_reference(x, w), io)
    rms_comp = r.time("rmsnorm", key, "torch.compile(reference)", lambda: compiled_rms(x, w), io)

    add = r.time("add", key, "triton", lambda: triton_add(x, res), 3 * x.numel() * 2)
    add_eager = r.time("add", key, "torch eager", lambda: x + res, 3 * x.numel() * 2)
    add_comp = r.time("add", key, "torch.compile", lambda: compiled_add(x, res), 3 * x.numel() * 2)

    _max_error(report, f"softmax {key}", triton_softmax(x), softmax_reference(x))
    sm = r.time("softmax", key, "triton", lambda: triton_softmax(x), io)
    sm_eager = r.time("softmax", key, "torch eager (torch.softmax)", lambda: torch.softmax(x, -1), io)
    sm_comp = r.time("softmax", key, "torch.compile(reference)", lambda: compiled_softmax(x), io)

    fused_io = 4 * x.numel() * 2  # read x and residual, write y and the new residual
    _max_error(
        report, f"fused_add_rmsnorm {key}", triton_fused_add_rmsnorm(x, res, w)[0], hf_rmsnorm_unfused(x, res, w)[0]
    )
    fused = r.time("fused add+rmsnorm", key, "triton", lambda: triton_fused_add_rmsnorm(x, res, w), fused_io)
    unfused = r.time(
        "fused add+rmsnorm", key, "torch eager unfused (HF LlamaRMSNorm)", lambda: hf_rmsnorm_unfused(x, res, w)
    )
    fused_comp = r.time(
        "fused add+rmsnorm", key, "torch.compile(reference)", lambda: compiled_fused(x, res, w), fused_io
    )

    if shape == SMALL:
        for name, fast, eager in [
            ("layernorm", ln, ln_eager),
            ("rmsnorm", rms, rms_eager),
            ("add", add, add_eager),
            ("softmax", sm, sm_eager),
        ]:
            ratio = _ratio(eager, fast)
            r.check(
                f"{name} {key}: GPU time no worse than torch eager",
                f"{_fmt(fast.ms, '.4f')} ms vs {_fmt(eager.ms, '.4f')} ms ({_fmt(ratio)}x); eager calls "
                f"{_fmt(fast.eager_ms, '.4f')} vs {_fmt(eager.eager_ms, '.4f')} ms",
                None if ratio is None else ratio >= 1.0,
            )
        return

    for name, fast, comp, pct in [
        ("layernorm", ln, ln_comp, NORM_COPY_PCT),
        ("rmsnorm", rms, rms_comp, NORM_COPY_PCT),
        ("fused add+rmsnorm", fused, fused_comp, NORM_COPY_PCT),
        ("add", add, add_comp, 90.0),
        ("softmax", sm, sm_comp, 85.0),
    ]:
        r.check(
            f"{name} {key}: >= {pct:.0f}% of copy bandwidth",
            f"{_fmt(fast.gbps, '.0f')} GB/s = {_fmt(fast.pct_of_copy, '.1f')}%",
            None if fast.pct_of_copy is None else fast.pct_of_copy >= pct,
        )
        if name != "softmax":
            ratio = _ratio(comp, fast)
            r.check(
                f"{name} {key}: no slower than torch.compile",
                _speedup(comp, fast) + (f" (compile failed: {comp.error})" if comp.error else ""),
                None if ratio is None else ratio >= 0.995,
            )
    ratio = _ratio(unfused, fused)
    r.check(
        f"fused add+rmsnorm {key}: >= 3x the unfused PyTorch code",
        _speedup(unfused, fused),
        None if ratio is None else ratio >= 3.0,
    )
    ratio = _ratio(ln_eager, ln)
    r.check(
        f"guide claim 'fused LayerNorm 1.5-2x' {key} (vs F.layer_norm)",
        _speedup(ln_eager, ln),
        None if ratio is None else ratio >= 1.5,
    )

    # LayerNorm backward: dx, dweight, dbias, as autograd computes them (no accumulation into .grad). Autograd
    # runs a backward on its forward's stream, so both run on a side stream, where a CUDA graph can capture them.
    xg = x.detach().clone().requires_grad_(True)
    wg = w.detach().clone().requires_grad_(True)
    bg = b.detach().clone().requires_grad_(True)
    dy = torch.randn_like(x)
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y_ours = triton_layernorm(xg, wg, bg)
        y_torch = F.layer_norm(xg, (n,), wg, bg)
        bwd_io = 3 * x.numel() * 2  # read x and dy, write dx
        ours = r.time(
            "layernorm backward",
            key,
            "triton",
            lambda: torch.autograd.grad(y_ours, (xg, wg, bg), dy, retain_graph=True),
            bwd_io,
        )
        theirs = r.time(
            "layernorm backward",
            key,
            "torch (F.layer_norm)",
            lambda: torch.autograd.grad(y_torch, (xg, wg, bg), dy, retain_graph=True),
            bwd_io,
        )
    torch.cuda.current_stream().wait_stream(side)
    ratio = _ratio(theirs, ours)
    r.check(
        f"layernorm backward {key}: no slower than PyTorch's",
        _speedup(theirs, ours),
        None if ratio is None else ratio >= 1,
    )


def run(report: Report) -> None:
    from llamatelemetry_triton import (
        fused_add_rmsnorm_reference,
        layernorm_reference,
        rmsnorm_reference,
        softmax_reference,
        triton_softmax,
    )

    r = Runner(report)
    compiled = {
        "layernorm": _compiled(layernorm_reference),
        "rmsnorm": _compiled(rmsnorm_reference),
        "add": _compiled(torch.add),
        "softmax": _compiled(softmax_reference),
        "fused": _compiled(fused_add_rmsnorm_reference),
    }
    compiled_softmax = compiled["softmax"]

    for shape in [*SHAPES, SMALL, VOCAB]:
        r.copy(shape)

    for shape in [*SHAPES, SMALL]:
        _row_cases(r, report, shape, compiled)

    key = "x".join(map(str, VOCAB))
    logits = torch.randn(VOCAB, device="cuda", dtype=FP16) * 4
    io = 2 * logits.numel() * 2
    _max_error(report, f"softmax {key}", triton_softmax(logits), softmax_reference(logits))
    sm = r.time("softmax", key, "triton", lambda: triton_softmax(logits), io)
    sm_eager = r.time("softmax", key, "torch eager (torch.softmax)", lambda: torch.softmax(logits, -1), io)
    r.time("softmax", key, "torch.compile(reference)", lambda: compiled_softmax(logits), io)
    ratio = _ratio(sm_eager, sm)
    r.check(f"softmax {key}: no slower than torch", _speedup(sm_eager, sm), None if ratio is None else ratio >= 1.0)


def _versions() -> dict[str, str]:
    import triton

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": getattr(triton, "__version__", "unknown"),
    }


def _device() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
    }


def _markdown(report: Report) -> str:
    lines = [
        f"# llamatelemetry-triton on {report.device['name']}",
        "",
        ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        "",
        "Medians of `triton.testing.do_bench` (L2 flushed before each repetition). GPU ms: the call replayed "
        "from a CUDA graph (no host work); eager ms: the call made from Python each time (host work included, "
        "which dominates small shapes). GB/s (from GPU ms) count bytes read + written once; % is of the "
        "device-to-device copy at the same size, measured in the same run. Targets are judged on GPU time; "
        "eager ratios are shown beside them.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for c in report.checks:
        met = "n/a" if c.passed is None else ("yes" if c.passed else "**no**")
        lines.append(f"| {c.target} | {c.measured} | {met} |")
    lines += [
        "",
        "## Timings",
        "",
        "| case | shape | implementation | GPU ms | GB/s | % of copy | eager ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in report.timings:
        ms = t.error if t.ms is None else f"{t.ms:.4f}"
        lines.append(
            f"| {t.case} | {t.shape} | {t.impl} | {ms} | {_fmt(t.gbps, '.0f')} | {_fmt(t.pct_of_copy, '.1f')} "
            f"| {_fmt(t.eager_ms, '.4f')} |"
        )
    lines += ["", "## Largest absolute error against the reference", ""]
    lines += [f"- {name}: {err:.3g}" for name, err in report.max_errors.items()]
    return "\n".join(lines) + "\n"


def _table(report: Report) -> str:
    width = max(len(c.target) for c in report.checks) if report.checks else 10
    rows = [f"{'target':<{width}}  {'measured':<60} met"]
    for c in report.checks:
        met = "n/a" if c.passed is None else ("yes" if c.passed else "NO")
        rows.append(f"{c.target:<{width}}  {c.measured:<60} {met}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="folder (default: results/<gpu-slug>/triton)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton: needs a CUDA GPU; torch sees none", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("bench_triton: needs Triton (pip install triton)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    report = Report(device=_device(), versions=_versions())
    run(report)
    out = args.out or Path(__file__).resolve().parents[1] / "results" / device_slug() / "triton"
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": envelope("triton")} | asdict(report) | {"seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    (out / "results.md").write_text(_markdown(report), encoding="utf-8")
    print(f"\nwrote {out / 'results.json'} and results.md in {payload['seconds']} s on {report.device['name']}\n")
    print(_table(report))
    missed = [c.target for c in report.checks if c.passed is False]
    if missed:
        print(f"missed targets: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
