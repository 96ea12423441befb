"""The small-M projections in the engine's batched decode, on against off, on one Hopper GPU.

Usage (no network; from the repository root):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/engine/ab_small_m.py [--out DIR]

The engine as ``bench_engine.py`` builds it (Llama-3.2-1B shape, random weights, fp16, ``max_model_len`` 512,
``max_batch_size`` 64), decode at batch 16, 32 and 64 (prompt 128, 128 new tokens, ``engine_decode``) with the
projections of steps of 9 to 64 tokens through ``triton_linear``'s small-M kernel (the default on Hopper) and
through cuBLAS with the SwiGLU kernel (every layer's ``small_m_tokens`` set to 0): three runs per variant,
interleaved, in one process; then the greedy tokens of both (sixteen prompts together) compared. Writes
``small-m.md`` and ``small-m.json`` into DIR (default ``benchmarks/results/<gpu-slug>/engine``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import copy_bandwidth, engine_decode, step_bytes

from llamatelemetry_core.testing.bench import device_slug
from llamatelemetry_engine import LLM, PRESETS, SamplingParams, random_weights
from llamatelemetry_engine.models import DecoderLayer

BATCHES = (16, 32, 64)
VARIANTS = ("small-M kernel (default)", "cuBLAS + SwiGLU kernel (off)")


def build(loaded: Any, variant: str) -> LLM:
    llm = LLM(loaded, device="cuda", max_model_len=512, max_batch_size=64, warmup=False)
    if variant == VARIANTS[1]:
        for layer in llm.model.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.small_m_tokens = 0
    return llm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/<gpu-slug>/engine)")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        print("ab_small_m: needs a Hopper GPU (compute capability 9.x), where the small-M kernel runs", file=sys.stderr)
        return 2
    loaded = random_weights(PRESETS["llama-3.2-1b"], seed=0, dtype=torch.float16)
    bandwidth = copy_bandwidth()
    rates: dict[str, dict[int, list[float]]] = {v: {b: [] for b in BATCHES} for v in VARIANTS}
    tokens: dict[str, list[list[int]]] = {}
    for run in range(args.runs):
        for variant in VARIANTS:
            llm = build(loaded, variant)
            for batch in BATCHES:
                rates[variant][batch].append(engine_decode(llm, batch, 128, 128)["decode_tokens_per_s"])
                print(run, variant, batch, f"{rates[variant][batch][-1]:.0f} tok/s", flush=True)
            if run == 0:
                prompts = [list(range(100 + i, 164 + i)) for i in range(16)]
                done = llm.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))
                tokens[variant] = [list(c.token_ids) for c in done]
            del llm
            torch.cuda.empty_cache()
    same = len({json.dumps(t) for t in tokens.values()}) == 1
    roofline = {b: bandwidth / step_bytes(loaded, b, 128 + 64) * b for b in BATCHES}
    lines = [
        f"# Small-M projections in the engine's decode on {torch.cuda.get_device_name()} (torch {torch.__version__})",
        "",
        f"`benchmarks/engine/ab_small_m.py`: Llama-3.2-1B shape, fp16, prompt 128, 128 new tokens; copy "
        f"{bandwidth / 1e9:.0f} GB/s; {args.runs} interleaved runs per variant in one process.",
        "",
        "| variant | batch | decode tok/s (median) | of roofline | runs |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        for b in BATCHES:
            values = rates[variant][b]
            m = statistics.median(values)
            lines.append(f"| {variant} | {b} | {m:,.0f} | {m / roofline[b]:.1%} | "
                         f"{', '.join(f'{v:.0f}' for v in values)} |")  # fmt: skip
    lines += ["", f"Same greedy tokens (32 from sixteen prompts together) with and without: {same}."]
    text = "\n".join(lines) + "\n"
    out_dir = args.out or Path(__file__).resolve().parents[1] / "results" / device_slug() / "engine"
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"copy_gb_s": bandwidth / 1e9, "roofline_tokens_per_s": roofline,
                              "decode_tokens_per_s": rates, "same_greedy_tokens": same}  # fmt: skip
    (out_dir / "small-m.md").write_text(text, encoding="utf-8")
    (out_dir / "small-m.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(text)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
