"""Two launches taken out of the engine's decode step, on against off, on one GPU.

Usage (no network; from the repository root):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/engine/ab_step_launches.py [--out DIR]

The engine as ``bench_engine.py`` builds it (Llama-3.2-1B shape, random weights, fp16, ``max_model_len`` 512,
``max_batch_size`` 64), decode at batch 1, 32 and 64 (prompt 128, 128 new tokens, ``engine_decode``), four
variants, three runs each, interleaved in one process:

* now: the split-K counts of the small-M down projection kept zero between launches (``split_counters``), and the
  greedy tokens picked by ``triton_argmax``;
* zero-filled counts: a fresh ``torch.zeros`` before every split launch, as before (a fill kernel per layer,
  outside the programmatic dependent launch chain);
* torch.argmax: the greedy tokens by ``torch.argmax`` (the runner's ``argmax`` replaced);
* before: both.

Then the greedy tokens of every variant (sixteen prompts together) are compared. Writes ``step-launches.md`` and
``step-launches.json`` into DIR (default ``benchmarks/results/<gpu-slug>/engine``).
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
from llamatelemetry_engine.runner import ModelRunner
from llamatelemetry_triton.ops import _linear_kernel

BATCHES = (1, 32, 64)
VARIANTS = ("now", "zero-filled counts", "torch.argmax", "before (both)")
_KEPT_COUNTERS = _linear_kernel.split_counters


def _fresh_counters(device: torch.device, blocks: int) -> torch.Tensor:
    return torch.zeros(blocks, dtype=torch.int32, device=device)


def _torch_argmax(self: ModelRunner, logits: torch.Tensor) -> torch.Tensor:
    return torch.argmax(logits, dim=-1)


_TRITON_ARGMAX = ModelRunner.argmax


def _use(variant: str) -> None:
    """Patch ``variant``'s launches in, module-wide (the variants run one after another)."""
    zero_filled = variant in (VARIANTS[1], VARIANTS[3])
    _linear_kernel.split_counters = _fresh_counters if zero_filled else _KEPT_COUNTERS
    torch_argmax = variant in (VARIANTS[2], VARIANTS[3])
    ModelRunner.argmax = _torch_argmax if torch_argmax else _TRITON_ARGMAX  # type: ignore[method-assign]


def build(loaded: Any, variant: str) -> LLM:
    _use(variant)
    return LLM(loaded, device="cuda", max_model_len=512, max_batch_size=64, warmup=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/<gpu-slug>/engine)")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("ab_step_launches: needs a GPU", file=sys.stderr)
        return 2
    title = "Split-K counts kept zero, and the Triton arg-max, in the engine's decode"
    try:
        return decode_ab(build, VARIANTS, BATCHES, args.runs, ("step-launches", title, "ab_step_launches.py", args.out))
    finally:
        _use(VARIANTS[0])  # the library's own launches again


if __name__ == "__main__":
    raise SystemExit(main())
