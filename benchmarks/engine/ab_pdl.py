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
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import decode_ab

from llamatelemetry_core.environment import PDL_ENV, reload_launch_env
from llamatelemetry_engine import LLM, SamplingParams
from llamatelemetry_engine.loader import LoadedModel

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

    def build(loaded: LoadedModel, variant: str) -> LLM:
        os.environ[PDL_ENV] = VARIANTS[variant]
        reload_launch_env()  # read once per process otherwise
        return LLM(loaded, device="cuda", max_model_len=512, max_batch_size=64)

    def greedy(llm: LLM) -> list[list[int]]:
        prompts = [list(range(100 + i, 164 + i)) for i in range(5)]
        params = SamplingParams(max_tokens=32, ignore_eos=True)
        together = llm.generate(prompts, params)
        alone = llm.generate(prompts[:1], params)
        return [list(c.token_ids) for c in together] + [list(alone[0].token_ids)]

    report = ("pdl", "PDL in the engine's decode", "ab_pdl.py", args.out)
    note = "32 from five prompts together and one alone"
    try:
        return decode_ab(build, list(VARIANTS), BATCHES, args.runs, report, greedy, note)
    finally:
        os.environ.pop(PDL_ENV, None)
        reload_launch_env()


if __name__ == "__main__":
    raise SystemExit(main())
