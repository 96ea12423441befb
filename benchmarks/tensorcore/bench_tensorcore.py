"""Tensor Core benchmarks of llamatelemetry-tensorcore, each against an fp32 baseline measured in the same run.

Usage (no network, no installs; from the repository root):

    PYTHONPATH=packages/llamatelemetry-core/src:packages/llamatelemetry-tensorcore/src \\
        python benchmarks/tensorcore/bench_tensorcore.py --out DIR

1. ``matmul_tensor_core`` on fp32 inputs (conversion, range scaling and padding included) vs ``torch.matmul``
   in fp32 with TF32 off, on 1024, 4096 and 8192 cubes: TFLOP/s (2 M N K / time), the ratio, and the error of
   both against an fp64 reference. Also shown, for context: the bare fp16 matmul on inputs already in fp16 and
   the fp32 matmul with TF32 on. On an H100 the ratio at 8192 must be >= 5x.
2. ``optimize_for_tensor_cores`` on a stack of 8 pre-norm transformer blocks (width 1024, 16 heads, MLP 4x,
   SDPA attention), batch 8, sequence 512, inference: latency and peak memory
   (``torch.cuda.max_memory_allocated``, weights included) vs the same model in fp32 with TF32 off; fp16 with
   everything cast, and fp16 with the norms kept in fp32 (``keep_fp32=True``).
3. The guide's claims for Tensor Cores ("2-4x throughput", "50% memory") against what was measured.

Times are medians of CUDA-event samples after warm-up. Writes ``results.json`` and ``summary.md`` into DIR
(default ``benchmarks/results/<gpu-slug>/tensorcore``) and prints a short table last. Exit status 1 when a
check fails. ``--device cpu`` runs the same code on the CPU with wall-clock timing, to smoke-test the script
(its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamatelemetry_core.device import get_device_info
from llamatelemetry_core.testing.bench import device_slug, envelope, gpu_ms, progress
from llamatelemetry_tensorcore import get_tensor_core_info, matmul_tensor_core, optimize_for_tensor_cores

REQUIRED_RATIO_8192 = 5.0
GUIDE_THROUGHPUT = (2.0, 4.0)
GUIDE_MEMORY_SAVING = 0.5


# --- timing -------------------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 10) -> float:
    """Median of ``repeats`` timings of ``fn`` in milliseconds, after ``warmup`` calls: CUDA events on a GPU (L2
    not flushed: a model's step finds what the previous one left), the wall clock on a CPU."""
    if device.type == "cuda":
        return gpu_ms(fn, reps=repeats, warmup=warmup, flush_l2=False)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


# --- 1. matmul ----------------------------------------------------------------------------------------------------


def _errors(result: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = result.double() - reference
    return {
        "relative_frobenius": float(diff.norm() / reference.norm()),
        "max_abs_over_max_ref": float(diff.abs().max() / reference.abs().max()),
    }


def bench_matmul(size: int, device: torch.device) -> dict[str, Any]:
    _free(device)
    gen = torch.Generator(device=device).manual_seed(size)
    a = torch.randn(size, size, device=device, generator=gen)
    b = torch.randn(size, size, device=device, generator=gen)
    flop = 2.0 * size**3
    row: dict[str, Any] = {"size": size}

    set_tf32(False)
    row["fp32_ms"] = median_ms(lambda: torch.matmul(a, b), device)
    row["tensor_core_ms"] = median_ms(lambda: matmul_tensor_core(a, b, dtype=torch.float16), device)
    a16, b16 = a.half(), b.half()
    row["fp16_only_ms"] = median_ms(lambda: torch.matmul(a16, b16), device)
    set_tf32(True)
    row["tf32_ms"] = median_ms(lambda: torch.matmul(a, b), device)
    set_tf32(False)

    for key in ("fp32", "tensor_core", "fp16_only", "tf32"):
        row[f"{key}_tflops"] = flop / (row[f"{key}_ms"] * 1e-3) / 1e12
    row["ratio"] = row["fp32_ms"] / row["tensor_core_ms"]

    reference = torch.matmul(a.double(), b.double())
    row["error_fp32"] = _errors(torch.matmul(a, b), reference)
    row["error_tensor_core"] = _errors(matmul_tensor_core(a, b, dtype=torch.float16), reference)
    return row


# --- 2. model -----------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm transformer block: LayerNorm, multi-head self-attention (SDPA), LayerNorm, GELU MLP 4x."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, seq, 3, self.heads, width // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, seq, width))
        out: torch.Tensor = x + self.down(F.gelu(self.up(self.norm2(x))))
        return out


def model_flop(layers: int, batch: int, seq: int, width: int) -> float:
    tokens = batch * seq
    dense = 2.0 * tokens * width * (3 * width + width + 4 * width + 4 * width)
    attention = 2.0 * 2.0 * batch * seq * seq * width
    return layers * (dense + attention)


def bench_model(
    variant: str, base: nn.Module, x_cpu: torch.Tensor, device: torch.device, expected: torch.Tensor | None
) -> tuple[dict[str, Any], torch.Tensor]:
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = copy.deepcopy(base)
    if variant == "fp32":
        model = model.to(device).eval()
    else:
        keep = variant == "fp16_keep_fp32_norms"
        model = optimize_for_tensor_cores(model, dtype=torch.float16, keep_fp32=keep, device=device)
    set_tf32(False)
    x = x_cpu.to(device)
    with torch.inference_mode():
        ms = median_ms(lambda: model(x), device)
        out = model(x).float()
    row: dict[str, Any] = {"variant": variant, "ms": ms}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
    else:
        row["peak_memory_bytes"] = None
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{variant}: the model produced non-finite outputs")
    if expected is not None:
        out_cpu = out.cpu()
        row["relative_error_vs_fp32"] = float((out_cpu - expected).norm() / expected.norm())
    return row, out.cpu()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- reporting ----------------------------------------------------------------------------------------------------


def summary_markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"# Tensor Core benchmarks on {env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}; datasheet fp16 "
        f"{env['datasheet']['fp16_tflops']} TFLOP/s, fp32 {env['datasheet']['fp32_tflops']} TFLOP/s.",
        "",
        "## matmul_tensor_core (fp32 in and out, conversion included) vs torch.matmul fp32 (TF32 off)",
        "",
        "| size | fp32 ms | fp32 TFLOP/s | matmul_tensor_core ms | TFLOP/s | ratio | fp16-only TFLOP/s "
        "| TF32 TFLOP/s | rel. error fp32 | rel. error tensor core |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["matmul"]:
        lines.append(
            f"| {r['size']} | {r['fp32_ms']:.3f} | {r['fp32_tflops']:.1f} | {r['tensor_core_ms']:.3f} | "
            f"{r['tensor_core_tflops']:.1f} | {r['ratio']:.2f}x | {r['fp16_only_tflops']:.1f} | {r['tf32_tflops']:.1f} "
            f"| {r['error_fp32']['relative_frobenius']:.2e} | {r['error_tensor_core']['relative_frobenius']:.2e} |"
        )
    m = results["model"]
    lines += [
        "",
        f"## optimize_for_tensor_cores: {m['layers']} blocks, width {m['width']}, batch {m['batch']}, "
        f"sequence {m['seq']} ({m['tflop']:.2f} TFLOP per forward)",
        "",
        "| variant | ms | TFLOP/s | speedup | peak memory MiB | memory vs fp32 | rel. error vs fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in m["rows"]:
        mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        ratio = "n/a" if r.get("memory_ratio") is None else f"{r['memory_ratio']:.2f}"
        err = f"{r['relative_error_vs_fp32']:.2e}" if "relative_error_vs_fp32" in r else "-"
        lines.append(
            f"| {r['variant']} | {r['ms']:.2f} | {r['tflops']:.1f} | {r['speedup']:.2f}x | {mem} | {ratio} | {err} |"
        )
    lines += ["", "## Checks and the guide's claims", ""]
    lines += [f"- {c['name']}: **{'pass' if c['ok'] else 'FAIL'}** ({c['detail']})" for c in results["checks"]]
    lines += [f"- {c}" for c in results["claims"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: results/<gpu>/tensorcore)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench_tensorcore: CUDA is not available; run on a GPU machine (or --device cpu)")
        device = torch.device("cuda", torch.cuda.current_device())
    started = time.perf_counter()
    info = get_device_info(device)
    tc_info = get_tensor_core_info(device)
    out_dir = args.out or Path(__file__).resolve().parents[1] / "results" / device_slug(device) / "tensorcore"
    out_dir.mkdir(parents=True, exist_ok=True)

    matmul_rows = []
    for size in args.sizes:
        progress(f"matmul {size}^3")
        matmul_rows.append(bench_matmul(size, device))
    progress("model: fp32, fp16, fp16 with fp32 norms")

    torch.manual_seed(0)
    base = nn.Sequential(*(Block(args.width, args.heads) for _ in range(args.layers))).eval()
    x_cpu = torch.randn(args.batch, args.seq, args.width)
    fp32_row, expected = bench_model("fp32", base, x_cpu, device, None)
    rows = [fp32_row]
    for variant in ("fp16", "fp16_keep_fp32_norms"):
        rows.append(bench_model(variant, base, x_cpu, device, expected)[0])
    flop = model_flop(args.layers, args.batch, args.seq, args.width)
    for r in rows:
        r["tflops"] = flop / (r["ms"] * 1e-3) / 1e12
        r["speedup"] = fp32_row["ms"] / r["ms"]
        fp32_mem = fp32_row["peak_memory_bytes"]
        r["memory_ratio"] = None if fp32_mem is None else r["peak_memory_bytes"] / fp32_mem

    checks: list[dict[str, Any]] = []
    for r in matmul_rows:
        bound = 4 * 2.0**-11  # four units of fp16 rounding, normwise
        err = r["error_tensor_core"]["relative_frobenius"]
        checks.append({"name": f"matmul {r['size']} error", "ok": err <= bound, "detail": f"{err:.2e} <= {bound:.2e}"})
    for r in rows[1:]:
        err = r["relative_error_vs_fp32"]
        checks.append({"name": f"model {r['variant']} error", "ok": err <= 2e-2, "detail": f"{err:.2e} <= 2e-2"})
    big = next((r for r in matmul_rows if r["size"] == 8192), None)
    if big is not None and info.spec_key is not None and info.spec_key.startswith("h100"):
        checks.append(
            {
                "name": "matmul 8192 ratio on an H100",
                "ok": big["ratio"] >= REQUIRED_RATIO_8192,
                "detail": f"{big['ratio']:.2f}x >= {REQUIRED_RATIO_8192}x",
            }
        )

    fp16 = rows[1]
    best_matmul = max(r["ratio"] for r in matmul_rows)
    claims = [
        f"guide: 'Tensor Cores (FP16): 2-4x throughput'. Measured: model {fp16['speedup']:.2f}x "
        f"(fp16 vs fp32 with TF32 off), matmul_tensor_core up to {best_matmul:.2f}x; "
        + (
            "within the claim"
            if GUIDE_THROUGHPUT[0] <= fp16["speedup"] <= GUIDE_THROUGHPUT[1]
            else ("above the claim" if fp16["speedup"] > GUIDE_THROUGHPUT[1] else "below the claim")
        ),
    ]
    if fp16["memory_ratio"] is not None:
        saving = 1.0 - fp16["memory_ratio"]
        claims.append(
            f"guide: 'Tensor Cores (FP16): 50% memory savings'. Measured peak memory (weights + activations): "
            f"{saving:.0%} less than fp32"
        )

    results: dict[str, Any] = {
        "benchmark": envelope("tensorcore"),
        "environment": {
            "device": info.name,
            "compute_capability": tc_info["compute_capability"],
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "datasheet": {k: tc_info[k] for k in ("fp16_tflops", "fp32_tflops", "tf32_tflops", "bf16_tflops")},
            "timing": "median of CUDA-event samples after warm-up" if device.type == "cuda" else "wall clock (CPU)",
        },
        "matmul": matmul_rows,
        "model": {
            "layers": args.layers,
            "width": args.width,
            "heads": args.heads,
            "batch": args.batch,
            "seq": args.seq,
            "tflop": flop / 1e12,
            "rows": rows,
        },
        "checks": checks,
        "claims": claims,
        "seconds": time.perf_counter() - started,
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out_dir / "summary.md").write_text(summary_markdown(results), encoding="utf-8")

    print(f"Tensor Core benchmarks on {info.name}, torch {torch.__version__}; results in {out_dir}")
    print(f"{'matmul':>10} {'fp32 TF/s':>10} {'TC TF/s':>9} {'ratio':>7} {'TC rel.err':>11}")
    for r in matmul_rows:
        print(
            f"{r['size']:>10} {r['fp32_tflops']:>10.1f} {r['tensor_core_tflops']:>9.1f} {r['ratio']:>6.2f}x "
            f"{r['error_tensor_core']['relative_frobenius']:>11.2e}"
        )
    print(f"{'model':>22} {'ms':>8} {'speedup':>8} {'mem vs fp32':>12}")
    for r in rows:
        mem = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        print(f"{r['variant']:>22} {r['ms']:>8.2f} {r['speedup']:>7.2f}x {mem:>12}")
    for c in checks:
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {c['name']}: {c['detail']}")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
