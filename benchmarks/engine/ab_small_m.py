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
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import decode_ab

from llamatelemetry_engine import LLM
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
    report = ("small-m", "Small-M projections in the engine's decode", "ab_small_m.py", args.out)
    return decode_ab(build, VARIANTS, BATCHES, args.runs, report)


if __name__ == "__main__":
    raise SystemExit(main())
