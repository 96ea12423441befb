"""Programmatic dependent launch (PDL) in the engine's decode, on against off, on one GPU of compute capability 9.0+.

Usage (no network; from the repository root):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/engine/ab_pdl.py [--out DIR]

The engine as ``bench_engine.py`` builds it (Llama-3.2-1B shape, random weights, fp16, ``max_model_len`` 512,
``max_batch_size`` 64), decode at batch 1 and 64 (prompt 128, 128 new tokens, ``engine_decode``), with the
Triton kernels launched with PDL (the default on Hopper) and with ``LLAMATELEMETRY_PDL=0``: three runs per
variant, interleaved, in one process; then the greedy tokens of both (five prompts together, and one alone)
compared. Writes ``pdl.md`` and ``pdl.json`` into DIR (default ``benchmarks/results/<gpu-slug>/engine``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import copy_bandwidth, engine_decode, step_bytes

from llamatelemetry_core.environment import PDL_ENV
from llamatelemetry_core.testing.bench import device_slug
from llamatelemetry_engine import LLM, PRESETS, SamplingParams, random_weights

BATCHES = (1, 64)
VARIANTS = {"PDL (default)": "1", "no PDL": "0"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/<gpu-slug>/engine)")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        print("ab_pdl: needs a CUDA GPU of compute capability 9.0 or newer", file=sys.stderr)
        return 2
    loaded = random_weights(PRESETS["llama-3.2-1b"], seed=0, dtype=torch.float16)
    bandwidth = copy_bandwidth()
    rates: dict[str, dict[int, list[float]]] = {v: {b: [] for b in BATCHES} for v in VARIANTS}
    tokens: dict[str, list[list[int]]] = {}
    for run in range(args.runs):
        for variant, env in VARIANTS.items():
            os.environ[PDL_ENV] = env
            llm = LLM(loaded, device="cuda", max_model_len=512, max_batch_size=64)
            for batch in BATCHES:
                rates[variant][batch].append(engine_decode(llm, batch, 128, 128)["decode_tokens_per_s"])
                print(run, variant, batch, f"{rates[variant][batch][-1]:.0f} tok/s", flush=True)
            if run == 0:
                prompts = [list(range(100 + i, 164 + i)) for i in range(5)]
                params = SamplingParams(max_tokens=32, ignore_eos=True)
                together = llm.generate(prompts, params)
                alone = llm.generate(prompts[:1], params)
                tokens[variant] = [list(c.token_ids) for c in together] + [list(alone[0].token_ids)]
            del llm
            torch.cuda.empty_cache()
    os.environ.pop(PDL_ENV, None)
    same = len({json.dumps(t) for t in tokens.values()}) == 1
    roofline = {b: bandwidth / step_bytes(loaded, b, 128 + 64) * b for b in BATCHES}
    lines = [
        f"# PDL in the engine's decode on {torch.cuda.get_device_name()} (torch {torch.__version__})",
        "",
        f"`benchmarks/engine/ab_pdl.py`: Llama-3.2-1B shape, fp16, prompt 128, 128 new tokens; copy "
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
    lines += ["", f"Same greedy tokens (32 from five prompts together and one alone) with and without: {same}."]
    text = "\n".join(lines) + "\n"
    out_dir = args.out or Path(__file__).resolve().parents[1] / "results" / device_slug() / "engine"
    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"copy_gb_s": bandwidth / 1e9, "roofline_tokens_per_s": roofline,
                              "decode_tokens_per_s": rates, "same_greedy_tokens": same}  # fmt: skip
    (out_dir / "pdl.md").write_text(text, encoding="utf-8")
    (out_dir / "pdl.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(text)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
