"""CUDA graph benchmarks of llamatelemetry-graphs on a small decoder step (8 layers, width 1024, fp16).

Usage (no network, no installs; from the repository root):

    PYTHONPATH=packages/llamatelemetry-core/src:packages/llamatelemetry-graphs/src \\
        python benchmarks/graphs/bench_graphs.py --out DIR

Three measurements, each against a baseline measured in the same run:

1. decoder step at batch 1: eager vs graph replay; our ``CUDAGraph.replay(new_x)`` vs a raw
   ``torch.cuda.CUDAGraph.replay()`` of the same work plus the ``copy_`` of the input (must cost <= 1.05x);
2. bucketed decode for every batch size 1..64: eager vs ``BatchBucketedGraphs`` (pad, replay, slice), which
   must beat eager at every size;
3. memory: graphs for every size 1..64 captured largest first into one pool must hold <= 1.2x the memory of
   the largest graph alone.

Times are medians of CUDA-event samples after warm-up. "latency" samples time one call from an idle GPU, so
host-side overhead counts; "throughput" samples time back-to-back calls. Writes ``results.json`` and
``summary.md`` into DIR (default ``benchmarks/results/<gpu-slug>/graphs``) and prints a short table last.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llamatelemetry_core.testing.bench import device_slug, envelope, progress
from llamatelemetry_graphs import BatchBucketedGraphs, CUDAGraph, GraphCaptureConfig, GraphPool

WIDTH, LAYERS, HEADS, CONTEXT, FFN = 1024, 8, 16, 32, 2816
MAX_BATCH = 64
REPLAY_OVERHEAD_LIMIT = 1.05
MEMORY_LIMIT = 1.2


# --- the workload ------------------------------------------------------------------------------------------------


class RMSNorm(torch.nn.Module):
    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype) * self.weight


class DecoderLayer(torch.nn.Module):
    """RMSNorm, single-query attention over a fixed context of ``CONTEXT`` keys, RMSNorm, SwiGLU MLP, residuals.

    Rows of the batch are independent (each attends to the same fixed context), as in a decode step: ~25
    small kernels per layer.
    """

    def __init__(self, width: int, heads: int, context: int, ffn: int, generator: torch.Generator) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.attn_norm, self.mlp_norm = RMSNorm(width), RMSNorm(width)
        self.q = torch.nn.Linear(width, width, bias=False)
        self.o = torch.nn.Linear(width, width, bias=False)
        self.gate_up = torch.nn.Linear(width, 2 * ffn, bias=False)
        self.down = torch.nn.Linear(ffn, width, bias=False)
        self.k_context: torch.Tensor
        self.v_context: torch.Tensor
        self.register_buffer("k_context", torch.randn(heads, context, self.head_dim, generator=generator) * 0.5)
        self.register_buffer("v_context", torch.randn(heads, context, self.head_dim, generator=generator) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        q = self.q(self.attn_norm(x)).view(batch, self.heads, 1, self.head_dim)
        scores = (q @ self.k_context.transpose(-1, -2)) * self.head_dim**-0.5
        attended = scores.softmax(-1) @ self.v_context
        x = x + self.o(attended.reshape(batch, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        out: torch.Tensor = x + self.down(F.silu(gate) * up)
        return out


class DecoderStep(torch.nn.Module):
    """``LAYERS`` decoder layers on hidden states [B, WIDTH]."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ModuleList(DecoderLayer(WIDTH, HEADS, CONTEXT, FFN, generator) for _ in range(LAYERS))
        for layer in self.layers:
            for name, param in layer.named_parameters():
                if "norm" not in name:
                    with torch.no_grad():
                        param.copy_(torch.randn(param.shape, generator=generator) * param.shape[-1] ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build_decoder(device: torch.device, dtype: torch.dtype = torch.float16) -> DecoderStep:
    return DecoderStep().to(device, dtype).eval()


def step_cost(batch: int) -> tuple[float, float]:
    """(FLOPs, bytes of weights read) of one decoder step at ``batch``."""
    matmul_params = LAYERS * (2 * WIDTH * WIDTH + 3 * WIDTH * FFN)
    attention = LAYERS * 2 * 2 * WIDTH * CONTEXT  # q @ K^T and p @ V per row
    flops = 2.0 * matmul_params * batch + attention * batch
    weight_bytes = 2.0 * (matmul_params + LAYERS * 2 * HEADS * CONTEXT * (WIDTH // HEADS) + LAYERS * 2 * WIDTH)
    return flops, weight_bytes


# --- timing ------------------------------------------------------------------------------------------------------


def event_samples(fn: Callable[[], object], *, reps: int, inner: int = 1) -> list[float]:
    """``reps`` CUDA-event timings (ms per call) of ``inner`` back-to-back calls, each sample from an idle GPU."""
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / inner)
    return samples


def median_ms(fn: Callable[[], object], *, warmup: int, reps: int, inner: int = 1) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(event_samples(fn, reps=reps, inner=inner))


def interleaved_medians(
    candidates: dict[str, Callable[[], object]], *, warmup: int, rounds: int, reps: int, inner: int = 1
) -> dict[str, float]:
    """Medians over ``rounds`` rounds that alternate the candidates' order, so drift hits all of them alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name].extend(event_samples(candidates[name], reps=reps, inner=inner))
    return {name: statistics.median(values) for name, values in samples.items()}


def host_us_per_call(fn: Callable[[], object], *, calls: int = 200, repeats: int = 5) -> float:
    """Median host time (µs) to issue one call, GPU work left to run asynchronously."""
    results = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        results.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(results)


# --- 1. decoder step: eager, our replay, raw replay ------------------------------------------------------------


def raw_torch_graph(model: torch.nn.Module, static_input: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, Any]:
    """The baseline exactly as PyTorch's notes write it, by hand (not through a helper): warm up on a side stream,
    capture ``model(static_input)``; the caller copies each new input into ``static_input`` and replays."""
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model(static_input)
    torch.cuda.current_stream().wait_stream(side)
    raw = torch.cuda.CUDAGraph()
    with torch.cuda.graph(raw):
        output = model(static_input)
    return raw, output


def bench_decoder_step(model: DecoderStep, device: torch.device, quick: bool) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    new_x = torch.randn(1, WIDTH, generator=generator).to(device, torch.float16)
    ours_input = torch.randn(1, WIDTH, generator=generator).to(device, torch.float16)
    raw_input = ours_input.clone()

    graph = CUDAGraph(GraphCaptureConfig(warmup_iters=3))
    graph.capture(model, inputs=(ours_input,))

    raw, raw_output = raw_torch_graph(model, raw_input)

    def raw_call() -> Any:
        raw_input.copy_(new_x)
        raw.replay()
        return raw_output

    candidates: dict[str, Callable[[], object]] = {
        "eager": lambda: model(new_x),
        "ours": lambda: graph.replay(new_x),
        "raw": raw_call,
    }
    eager_out, ours_out, raw_out = model(new_x), graph.replay(new_x).clone(), raw_call().clone()
    max_err = max(float((ours_out - eager_out).abs().max()), float((raw_out - eager_out).abs().max()))

    rounds, reps = (4, 25) if quick else (10, 60)
    latency = interleaved_medians(candidates, warmup=10, rounds=rounds, reps=reps)
    throughput = interleaved_medians(candidates, warmup=10, rounds=rounds, reps=max(reps // 5, 5), inner=20)
    host = {name: host_us_per_call(fn) for name, fn in candidates.items() if name != "eager"}
    flops, weight_bytes = step_cost(1)
    return {
        "batch": 1,
        "latency_ms": latency,
        "throughput_ms": throughput,
        "host_us_per_call": host,
        "graph_speedup_vs_eager": latency["eager"] / latency["ours"],
        "ours_over_raw_latency": latency["ours"] / latency["raw"],
        "ours_over_raw_throughput": throughput["ours"] / throughput["raw"],
        "achieved": {
            name: {"weights_GBps": weight_bytes / (ms * 1e-3) / 1e9, "TFLOPs": flops / (ms * 1e-3) / 1e12}
            for name, ms in latency.items()
        },
        "max_abs_err_vs_eager": max_err,
        "kernels_note": f"{LAYERS} layers x ~25 kernels (RMSNorm, q/o/gate_up/down GEMMs, attention, residuals)",
        "pass": latency["ours"] <= REPLAY_OVERHEAD_LIMIT * latency["raw"],
    }


# --- 2. bucketed decode over batch sizes 1..64 -------------------------------------------------------------------


def bench_buckets(model: DecoderStep, device: torch.device, quick: bool) -> dict[str, Any]:
    example = torch.zeros(1, WIDTH, device=device, dtype=torch.float16)
    buckets = BatchBucketedGraphs(model, (example,), max_batch_size=MAX_BATCH).capture()
    generator = torch.Generator().manual_seed(2)
    rows: list[dict[str, Any]] = []
    reps = 15 if quick else 40
    for batch in range(1, MAX_BATCH + 1):
        x = torch.randn(batch, WIDTH, generator=generator).to(device, torch.float16)
        err = float((buckets(x) - model(x)).abs().max())
        candidates: dict[str, Callable[[], object]] = {
            "eager": lambda x=x: model(x),  # type: ignore[misc]
            "bucketed": lambda x=x: buckets(x),  # type: ignore[misc]
        }
        timed = interleaved_medians(candidates, warmup=3, rounds=2, reps=reps)
        rows.append(
            {
                "batch": batch,
                "bucket": buckets.bucket_for(batch),
                "eager_ms": timed["eager"],
                "bucketed_ms": timed["bucketed"],
                "speedup": timed["eager"] / timed["bucketed"],
                "max_abs_err_vs_eager": err,
            }
        )
    return {
        "batch_sizes": buckets.batch_sizes,
        "rows": rows,
        "slowest_speedup": min(r["speedup"] for r in rows),
        "pass": all(r["bucketed_ms"] < r["eager_ms"] for r in rows),
    }


# --- 3. memory of a pool of graphs ----------------------------------------------------------------------------------


def _settle() -> tuple[int, int]:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(), torch.cuda.memory_allocated()


def _measure(build: Callable[[], Any]) -> dict[str, Any]:
    reserved0, allocated0 = _settle()
    holder = build()
    torch.cuda.synchronize()
    usage = holder.memory_usage()
    result = {
        "pool_reserved_bytes": usage.reserved_bytes,
        "pool_allocated_bytes": usage.allocated_bytes,
        "pool_segments": usage.segments,
        "reserved_delta_bytes": torch.cuda.memory_reserved() - reserved0,
        "allocated_delta_bytes": torch.cuda.memory_allocated() - allocated0,
        "graphs": len(holder.pool) if isinstance(holder, BatchBucketedGraphs) else len(holder),
    }
    del holder
    _settle()
    return result


def bench_memory(model: DecoderStep, device: torch.device) -> dict[str, Any]:
    example = torch.zeros(1, WIDTH, device=device, dtype=torch.float16)

    def every_size_pool() -> GraphPool:
        pool = GraphPool()
        for size in range(MAX_BATCH, 0, -1):
            pool.capture(f"batch_{size}", model, inputs=(torch.zeros(size, WIDTH, device=device, dtype=example.dtype),))
        return pool

    alone = _measure(lambda: BatchBucketedGraphs(model, (example,), batch_sizes=[MAX_BATCH]).capture())
    every = _measure(lambda: BatchBucketedGraphs(model, (example,), batch_sizes=range(1, MAX_BATCH + 1)).capture())
    default = _measure(lambda: BatchBucketedGraphs(model, (example,), max_batch_size=MAX_BATCH).capture())
    separate = _measure(every_size_pool)
    base = alone["pool_reserved_bytes"]
    ratio = every["pool_reserved_bytes"] / base if base else math.inf
    return {
        "method": (
            "pool bytes: sum of torch.cuda.memory_snapshot() segments whose segment_pool_id is the graphs' shared "
            "pool (reserved = segment sizes; allocated = live blocks: static outputs and whatever the graphs keep). "
            "Deltas of torch.cuda.memory_reserved()/memory_allocated() around each build (after empty_cache) are "
            "reported beside them: they also count the static input buffers (outside the pool) and warm-up "
            "memory cached by the allocator."
        ),
        "largest_alone": alone,
        "every_size_1_to_64_buckets": every,
        "default_buckets": default,
        "every_size_1_to_64_graphpool_separate_outputs": separate,
        "ratio_every_size_over_largest": ratio,
        "ratio_default_over_largest": default["pool_reserved_bytes"] / base if base else math.inf,
        "ratio_graphpool_over_largest": separate["pool_reserved_bytes"] / base if base else math.inf,
        "pass": ratio <= MEMORY_LIMIT,
    }


# --- report --------------------------------------------------------------------------------------------------------


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f} MiB"


def markdown(results: dict[str, Any]) -> str:
    env, step, buckets, memory = results["environment"], results["decoder_step"], results["buckets"], results["memory"]
    lat, thr, host = step["latency_ms"], step["throughput_ms"], step["host_us_per_call"]
    lines = [
        "# CUDA graph benchmarks (llamatelemetry-graphs)",
        "",
        f"Device: {env['device']} (sm_{env['sm']}), torch {env['torch']}, CUDA {env['cuda']}, {env['date']}.",
        f"Workload: decoder step, {LAYERS} layers, width {WIDTH}, {HEADS} heads over a fixed context of {CONTEXT}, "
        f"SwiGLU MLP {FFN}, fp16. Medians of CUDA-event samples after warm-up.",
        "",
        "## Decoder step, batch 1",
        "",
        "| path | latency ms | throughput ms/call | host µs/call | weights GB/s |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "eager": "eager",
        "raw": "raw torch.cuda.CUDAGraph (copy_ + replay)",
        "ours": "CUDAGraph.replay(new_x)",
    }
    for name, label in labels.items():
        achieved = step["achieved"][name]["weights_GBps"]
        host_us = f"{host[name]:.1f}" if name in host else "-"
        lines.append(f"| {label} | {lat[name]:.4f} | {thr[name]:.4f} | {host_us} | {achieved:.0f} |")
    lines += [
        "",
        f"Graph replay speedup over eager: {step['graph_speedup_vs_eager']:.2f}x. Ours / raw: "
        f"{step['ours_over_raw_latency']:.3f} (latency), {step['ours_over_raw_throughput']:.3f} (throughput); "
        f"limit {REPLAY_OVERHEAD_LIMIT}: **{'PASS' if step['pass'] else 'FAIL'}**. "
        f"Max |graph - eager| = {step['max_abs_err_vs_eager']:.3g}.",
        "",
        f"## Bucketed decode, batch 1..{MAX_BATCH} (buckets {buckets['batch_sizes']})",
        "",
        "| batch | bucket | eager ms | bucketed ms | speedup | max abs err |",
        "|---|---|---|---|---|---|",
    ]
    for row in buckets["rows"]:
        lines.append(
            f"| {row['batch']} | {row['bucket']} | {row['eager_ms']:.4f} | {row['bucketed_ms']:.4f} | "
            f"{row['speedup']:.2f}x | {row['max_abs_err_vs_eager']:.3g} |"
        )
    lines += [
        "",
        f"Bucketed beats eager at every size: **{'PASS' if buckets['pass'] else 'FAIL'}** "
        f"(slowest speedup {buckets['slowest_speedup']:.2f}x).",
        "",
        "## Memory",
        "",
        memory["method"],
        "",
        "| graphs | pool reserved | pool allocated | reserved delta | allocated delta | vs largest |",
        "|---|---|---|---|---|---|",
    ]
    base = memory["largest_alone"]["pool_reserved_bytes"]
    for key, label in (
        ("largest_alone", f"largest ({MAX_BATCH}) alone"),
        ("every_size_1_to_64_buckets", "BatchBucketedGraphs, every size 1..64"),
        ("default_buckets", "BatchBucketedGraphs, default sizes"),
        ("every_size_1_to_64_graphpool_separate_outputs", "GraphPool, every size 1..64 (own outputs)"),
    ):
        m = memory[key]
        ratio = m["pool_reserved_bytes"] / base if base else math.inf
        lines.append(
            f"| {label} ({m['graphs']}) | {_mib(m['pool_reserved_bytes'])} | {_mib(m['pool_allocated_bytes'])} | "
            f"{_mib(m['reserved_delta_bytes'])} | {_mib(m['allocated_delta_bytes'])} | {ratio:.2f}x |"
        )
    lines += [
        "",
        f"Every size 1..64 over the largest alone: {memory['ratio_every_size_over_largest']:.2f}x, limit "
        f"{MEMORY_LIMIT}: **{'PASS' if memory['pass'] else 'FAIL'}**.",
        "",
    ]
    return "\n".join(lines)


def short_table(results: dict[str, Any]) -> str:
    step, buckets, memory = results["decoder_step"], results["buckets"], results["memory"]
    lat = step["latency_ms"]
    rows = [
        ("device", results["environment"]["device"], ""),
        ("eager step, batch 1 (ms)", f"{lat['eager']:.4f}", ""),
        ("graph replay, batch 1 (ms)", f"{lat['ours']:.4f}", f"{step['graph_speedup_vs_eager']:.2f}x vs eager"),
        ("raw replay + copy_ (ms)", f"{lat['raw']:.4f}", ""),
        ("ours / raw", f"{step['ours_over_raw_latency']:.3f}", "PASS" if step["pass"] else "FAIL"),
        ("bucketed vs eager, 1..64 (min)", f"{buckets['slowest_speedup']:.2f}x", "PASS" if buckets["pass"] else "FAIL"),
        (
            "pool 1..64 / largest",
            f"{memory['ratio_every_size_over_largest']:.2f}x",
            "PASS" if memory["pass"] else "FAIL",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:>12}  {note}" for name, value, note in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CUDA graph benchmarks of llamatelemetry-graphs")
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_graphs.py needs a CUDA device; none is available here", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    index: int | None = device.index  # None for a bare "cuda"
    if index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    props = torch.cuda.get_device_properties(device)
    out = args.out or Path(__file__).resolve().parents[1] / "results" / device_slug(device) / "graphs"
    out.mkdir(parents=True, exist_ok=True)

    model = build_decoder(device)
    with torch.inference_mode():
        progress("decoder step: eager, graph replay, raw CUDA graph")
        step = bench_decoder_step(model, device, args.quick)
        progress("batch buckets")
        buckets = bench_buckets(model, device, args.quick)
        progress("graph pool memory")
        memory = bench_memory(model, device)
    results = {
        "benchmark": envelope("graphs"),
        "environment": {
            "device": props.name,
            "sm": f"{props.major}{props.minor}",
            "sm_count": props.multi_processor_count,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "decoder_step": step,
        "buckets": buckets,
        "memory": memory,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (out / "summary.md").write_text(markdown(results), encoding="utf-8")
    print(f"wrote {out / 'results.json'} and {out / 'summary.md'}\n")
    print(short_table(results))
    return 0 if step["pass"] and buckets["pass"] and memory["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
