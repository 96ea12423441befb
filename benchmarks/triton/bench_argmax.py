"""The arg-max of greedy decoding against ``torch.argmax``, at the vocabularies and batch sizes of decode steps.

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/triton/bench_argmax.py [--sweep]

For 1 to 256 rows of 49152 (SmolLM2) and 128256 (Llama 3) fp16 logits: ``triton_argmax`` with its chosen launch
against ``torch.argmax(x, dim=-1)`` in the same run, each replayed from a CUDA graph (``do_bench_ms``, L2 flushed
before each replay), so a step's replayed graph sees these times. Before timing, both are checked equal on rows
built to trip an arg-max (equal maxima, NaN, a row of -inf, signed zeros) in fp16, bf16 and fp32. The note gives
the logits' bytes read as GB/s beside the device-to-device copy bandwidth of this run. ``--sweep`` also times
other blocks, warps and programs per SM (the heuristic's constants, ``ARGMAX_BLOCK`` and
``ARGMAX_PROGRAMS_PER_SM``) and reports the fastest. Target: no slower than ``torch.argmax`` at every case.
Results under ``benchmarks/results/<gpu-slug>/triton-argmax/``; the table is printed last.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from pathlib import Path

import torch

from llamatelemetry_core.testing.bench import Report, Row, copy_gbps, do_bench_ms, warm_gpu
from llamatelemetry_triton import triton_argmax
from llamatelemetry_triton._dispatch import device_info
from llamatelemetry_triton.heuristics import LaunchConfig, argmax_config
from llamatelemetry_triton.ops import argmax as argmax_module

VOCABS = (49152, 128256)
ROWS = (1, 8, 32, 64, 256)
SWEEP = [(block, warps, per_sm) for block in (1024, 2048, 4096) for warps in (4, 8) for per_sm in (1, 2, 4)]


def _hostile(rows: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(rows, vocab, device="cuda").to(dtype)
    x[:, vocab // 3] = x.float().max() + 1
    x[:, 2 * vocab // 3] = x[:, vocab // 3]
    if rows > 3:
        x[1, -1] = float("nan")
        x[2] = float("-inf")
        x[3] = 0.0
        x[3, 0] = -0.0
    return x


def _check() -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for rows in (1, 5, 64):
            for vocab in (*VOCABS, 151936, 1000):
                x = _hostile(rows, vocab, dtype)
                if not torch.equal(triton_argmax(x), x.argmax(-1)):
                    raise AssertionError(f"{rows} x {vocab} {dtype}: triton_argmax differs from torch.argmax")


def _config(rows: int, vocab: int, block: int, warps: int, per_sm: int) -> LaunchConfig:
    """The launch ``argmax_config`` chooses with these constants, on ``warps`` warps."""
    chosen = argmax_config(rows, vocab, device_info(torch.device("cuda")), block=block, programs_per_sm=per_sm)
    return dataclasses.replace(chosen, num_warps=warps)


def _forced_us(x: torch.Tensor, config: LaunchConfig) -> float:
    original = argmax_module._launch_config
    argmax_module._launch_config = lambda n_rows, like: config
    try:
        if not torch.equal(argmax_module._argmax_forward(x), x.argmax(-1)):
            raise AssertionError(f"forced {config}: differs from torch.argmax")
        return do_bench_ms(lambda: argmax_module._argmax_forward(x), graph=True) * 1e3
    finally:
        argmax_module._launch_config = original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: the results tree)")
    parser.add_argument("--sweep", action="store_true", help="also time other launch constants")
    args = parser.parse_args(argv)
    report = Report("triton-argmax")
    warm_gpu()
    _check()
    ceiling = copy_gbps(buffer_bytes=64 << 20, time_ms=functools.partial(do_bench_ms, graph=True))
    report.extra.update(copy_gbps=ceiling)
    for vocab in VOCABS:
        for rows in ROWS:
            x = torch.randn(rows, vocab, device="cuda", dtype=torch.float16)
            torch_us = do_bench_ms(functools.partial(torch.argmax, x, dim=-1), graph=True) * 1e3
            ours_us = do_bench_ms(functools.partial(triton_argmax, x), graph=True) * 1e3
            config = argmax_module._launch_config(rows, x)
            gbps = x.nbytes / (ours_us * 1e-6) / 1e9
            note = f"{config.splits} chunks of {config.chunk_size}; {gbps:.0f} GB/s of {ceiling:.0f} GB/s copy"
            group = f"{rows} x {vocab} fp16"
            report.add(Row(group, "triton_argmax", ours_us, "us", torch_us, "torch.argmax", note))
            report.check(f"no slower than torch.argmax, {group} (x)", torch_us / ours_us, 1.0)
            if args.sweep:
                timed = [(_forced_us(x, _config(rows, vocab, *c)), c) for c in SWEEP]
                best_us, (block, warps, per_sm) = min(timed)
                name = f"fastest of {len(SWEEP)}: block {block}, {warps} warps, {per_sm} per SM"
                report.add(Row(group, name, best_us, "us", ours_us, "chosen launch"))
    return report.finish(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
