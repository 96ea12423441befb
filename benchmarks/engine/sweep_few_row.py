"""The engine's few-row projections on one GPU: each kernel's launches swept inside a CUDA graph, then the engine.

Usage (no network; from the repository root):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/engine/sweep_few_row.py [--out DIR]

1. At Llama-3.2-1B's decode shapes (fp16), each few-row kernel of ``llamatelemetry-triton`` against what the
   engine runs without it, both timed as a decode step runs them: 16 layers' distinct weights (so no weight is
   found in L2) called back to back inside one CUDA graph, median replay time per layer. q/k/v and gate/up with
   the residual add and RMSNorm fused in against the fused norm kernel + cuBLAS; o against cuBLAS; down with the
   SwiGLU prologue against the SwiGLU kernel + cuBLAS. 42 launches each at one row: 24 with a program per
   column block looping over K (BLOCK_N 2-16, BLOCK_K 1024-4096, 4 or 8 warps) and 18 persistent ones holding
   the whole K (BLOCK_N 1-4, 132-528 programs, 4 or 8 warps); the launch the heuristic picks, and the fastest at
   one row again at 2 and 4 rows.
2. The engine at batch 1 (prompt 128, 128 new tokens, ``engine_decode`` of ``bench_engine.py``): few-row path
   on (the default) against off (every layer's ``few_row_tokens`` set to 0), three runs each, interleaved, with
   the greedy tokens of both compared.

Writes ``gemv-in-graph.md`` and ``gemv-in-graph.json`` into DIR (default
``benchmarks/results/<gpu-slug>/engine``) and prints the tables.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import copy_bandwidth, engine_decode, step_bytes

from llamatelemetry_core.device import get_device_info
from llamatelemetry_core.testing.bench import device_slug, gpu_ms
from llamatelemetry_engine import LLM, PRESETS, SamplingParams, random_weights
from llamatelemetry_engine.models import DecoderLayer
from llamatelemetry_triton import triton_fused_add_rmsnorm, triton_swiglu
from llamatelemetry_triton.heuristics import LaunchConfig, linear_config
from llamatelemetry_triton.ops._linear_kernel import linear_forward

LAYERS = 16
HIDDEN, INTERMEDIATE, QKV = 2048, 8192, 3072
EPS = 1e-5


def per_layer_us(fn: Callable[[], object]) -> float:
    """Median replay time of a CUDA graph of ``fn`` (which runs ``LAYERS`` layers), per layer, in us."""
    return gpu_ms(fn, graph=True, reps=30, warmup=3) * 1e3 / LAYERS


def launches(k: int) -> list[LaunchConfig]:
    looped = [
        LaunchConfig(block_size=bn, num_warps=warps, num_stages=2, chunk_size=bk)
        for bn, bk, warps in itertools.product((2, 4, 8, 16), (1024, 2048, 4096), (4, 8))
    ]
    persistent = [
        LaunchConfig(block_size=bn, num_warps=warps, num_stages=1, chunk_size=k, programs=programs)
        for bn, programs, warps in itertools.product((1, 2, 4), (132, 264, 528), (4, 8))
    ]
    return looped + persistent


def label(c: LaunchConfig) -> str:
    grid = f" programs={c.programs}" if c.programs else ""
    return f"BLOCK_N={c.block_size} BLOCK_K={c.chunk_size} warps={c.num_warps}{grid}"


def kernels(rows_table: list[dict[str, Any]]) -> None:
    dev, dt = "cuda", torch.float16
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev, dtype=dt) * scale

    weights = {
        "qkv": [randn(QKV, HIDDEN, scale=HIDDEN**-0.5) for _ in range(LAYERS)],
        "o": [randn(HIDDEN, HIDDEN, scale=HIDDEN**-0.5) for _ in range(LAYERS)],
        "gate_up": [randn(2 * INTERMEDIATE, HIDDEN, scale=HIDDEN**-0.5) for _ in range(LAYERS)],
        "down": [randn(HIDDEN, INTERMEDIATE, scale=INTERMEDIATE**-0.5) for _ in range(LAYERS)],
    }
    norm_weight = torch.rand(HIDDEN, generator=gen, device=dev, dtype=dt) + 0.5
    info = get_device_info(torch.device(dev))

    Pair = tuple[Callable[[LaunchConfig], Callable[[], object]], Callable[[], object]]

    def cases(rows: int) -> dict[str, Pair]:
        """Per case: (the kernel under a given launch, the baseline), each over the 16 layers."""
        xs = [randn(rows, HIDDEN) for _ in range(LAYERS)]
        rs = [randn(rows, HIDDEN) for _ in range(LAYERS)]
        gus = [randn(rows, 2 * INTERMEDIATE, scale=2.0) for _ in range(LAYERS)]

        def normed(name: str) -> Pair:
            layers = list(zip(xs, rs, weights[name], strict=True))

            def kernel(c: LaunchConfig) -> Callable[[], object]:
                return lambda: [linear_forward(x, r, norm_weight, w, None, EPS, config=c) for x, r, w in layers]

            return kernel, lambda: [F.linear(triton_fused_add_rmsnorm(x, r, norm_weight, EPS)[0], w)
                                    for x, r, w in layers]  # fmt: skip

        def plain(c: LaunchConfig) -> Callable[[], object]:
            return lambda: [linear_forward(x, None, None, w, None, 0.0, config=c) for x, w in o_layers]

        def glu_in(c: LaunchConfig) -> Callable[[], object]:
            return lambda: [linear_forward(g, None, None, w, None, 0.0, config=c, glu_input=True) for g, w in down]

        o_layers = list(zip(xs, weights["o"], strict=True))
        down = list(zip(gus, weights["down"], strict=True))
        return {
            "qkv + add + RMSNorm": normed("qkv"),
            "o": (plain, lambda: [F.linear(x, w) for x, w in o_layers]),
            "gate_up + add + RMSNorm": normed("gate_up"),
            "SwiGLU + down": (glu_in, lambda: [F.linear(triton_swiglu(g), w) for g, w in down]),
        }

    shapes = {"qkv + add + RMSNorm": (QKV, HIDDEN), "o": (HIDDEN, HIDDEN)}
    shapes |= {"gate_up + add + RMSNorm": (2 * INTERMEDIATE, HIDDEN), "SwiGLU + down": (HIDDEN, INTERMEDIATE)}
    fastest: dict[str, LaunchConfig] = {}
    for name, (triton_call, baseline) in cases(1).items():
        base = per_layer_us(baseline)
        swept = sorted((per_layer_us(triton_call(c)), label(c), c) for c in launches(shapes[name][1]))
        chosen = linear_config(1, *shapes[name], torch.float16, info)
        chosen_us = per_layer_us(triton_call(chosen))
        fastest[name] = swept[0][2]
        rows_table.append({"case": name, "rows": 1, "baseline_us": base, "chosen": label(chosen),
                           "chosen_us": chosen_us, "fastest": swept[0][1], "fastest_us": swept[0][0],
                           "slowest_us": swept[-1][0]})  # fmt: skip
        print(rows_table[-1], flush=True)
    for rows in (2, 4):
        for name, (triton_call, baseline) in cases(rows).items():
            chosen = linear_config(rows, *shapes[name], torch.float16, info)
            rows_table.append({"case": name, "rows": rows, "baseline_us": per_layer_us(baseline),
                               "chosen": label(chosen), "chosen_us": per_layer_us(triton_call(chosen)),
                               "fastest": label(fastest[name]), "fastest_us": per_layer_us(triton_call(fastest[name])),
                               "slowest_us": float("nan")})  # fmt: skip
            print(rows_table[-1], flush=True)


def engine(runs: int) -> dict[str, Any]:
    loaded = random_weights(PRESETS["llama-3.2-1b"], seed=0, dtype=torch.float16)
    bandwidth = copy_bandwidth()
    roofline = bandwidth / step_bytes(loaded, 1, 128 + 64)
    rates: dict[str, list[float]] = {"few-row kernels (default)": [], "cuBLAS and separate norms (off)": []}
    tokens: dict[str, list[int]] = {}
    for _ in range(runs):
        for variant in rates:
            llm = LLM(loaded, device="cuda", max_model_len=512, max_batch_size=1, warmup=False)
            if variant.endswith("(off)"):
                for layer in llm.model.model.layers:
                    assert isinstance(layer, DecoderLayer)
                    layer.few_row_tokens = 0
            rates[variant].append(engine_decode(llm, 1, 128, 128)["decode_tokens_per_s"])
            done = llm.generate([list(range(100, 164))], SamplingParams(max_tokens=32, ignore_eos=True))
            tokens[variant] = list(done[0].token_ids)
            del llm
            torch.cuda.empty_cache()
            print(variant, f"{rates[variant][-1]:.0f} tok/s", flush=True)
    same = len({tuple(t) for t in tokens.values()}) == 1
    return {"copy_gb_s": bandwidth / 1e9, "roofline_tokens_per_s": roofline, "decode_tokens_per_s": rates,
            "same_greedy_tokens": same}  # fmt: skip


def report(rows: list[dict[str, Any]], eng: dict[str, Any]) -> str:
    lines = [
        f"# Few-row projections on {torch.cuda.get_device_name()} (torch {torch.__version__})",
        "",
        f"Per layer, inside a CUDA graph over {LAYERS} layers' weights, fp16, Llama-3.2-1B's decode shapes "
        "(`benchmarks/engine/sweep_few_row.py`). Baseline: what the engine runs without the kernel (the fused "
        "norm kernel + cuBLAS; cuBLAS; the SwiGLU kernel + cuBLAS).",
        "",
        "| case | rows | baseline us | chosen launch | chosen us | vs baseline | fastest of 42 at one row | its us |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['rows']} | {r['baseline_us']:.2f} | {r['chosen']} | {r['chosen_us']:.2f} | "
            f"{r['baseline_us'] / r['chosen_us']:.2f}x | {r['fastest']} | {r['fastest_us']:.2f} |"
        )
    lines += ["", f"Engine decode at batch 1, prompt 128, 128 new tokens (copy {eng['copy_gb_s']:.0f} GB/s, "
              f"roofline {eng['roofline_tokens_per_s']:.0f} tok/s):", "",
              "| variant | decode tok/s (median) | of roofline | runs |", "|---|---|---|---|"]  # fmt: skip
    for variant, values in eng["decode_tokens_per_s"].items():
        m = statistics.median(values)
        lines.append(f"| {variant} | {m:,.0f} | {m / eng['roofline_tokens_per_s']:.1%} | "
                     f"{', '.join(f'{v:.0f}' for v in values)} |")  # fmt: skip
    lines += ["", f"Same greedy tokens (32 from one prompt) with and without: {eng['same_greedy_tokens']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/<gpu-slug>/engine)")
    parser.add_argument("--runs", type=int, default=3, help="engine runs per variant")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_few_row: needs a CUDA GPU", file=sys.stderr)
        return 2
    out_dir = args.out or Path(__file__).resolve().parents[1] / "results" / device_slug() / "engine"
    rows: list[dict[str, Any]] = []
    kernels(rows)
    torch.cuda.empty_cache()
    eng = engine(args.runs)
    text = report(rows, eng)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gemv-in-graph.md").write_text(text, encoding="utf-8")
    (out_dir / "gemv-in-graph.json").write_text(json.dumps({"kernels": rows, "engine": eng}, indent=2), "utf-8")
    print(text)
    return 0 if eng["same_greedy_tokens"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
