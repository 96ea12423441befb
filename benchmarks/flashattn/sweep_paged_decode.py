"""Paged decode at the engine's attention shape on one GPU: a sweep of tiles and split counts, with the launch the
library chooses marked.

Usage (from the repository root; no network, no installs; about four minutes on an H200, most of it compiling):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/flashattn/sweep_paged_decode.py

Shape: 32 query heads over 8 KV heads of 64 dimensions (Llama-3.2-1B, SmolLM2), fp16, pages of 16 tokens
shuffled across the pool, one query per sequence. Cases:

* short key ranges: context 192 in a block table of 32 pages (512 keys: the engine's decode at
  ``max_model_len=512``), batch 1, 8 and 64; 48 tile configurations (16 rows x 32/64/128 keys, 2-8 warps, 1-4
  stages, with and without one block id per page) x 1-8 splits;
* long key ranges: batch 4 and 32 at context 4096, batch 8 at 2048, batch 64 at 1024 (tables exactly as wide as
  the context), and the offline workload's shape: batch 32 and 64 with lengths uniform in 100..2048 (seed 0) in a
  table of 2112 keys; 64- and 128-key tiles in 4 warps, 1-6 stages (5 and 6 are the first that double-buffer K
  and V, see ``paged_tiles``), one block id per page, and the table's row before 2026-12-01 (128 keys, 3 stages,
  an id per key), with the library's split count.

Every launch writes into an output filled with NaN and is checked against the PyTorch reference (computed in
fp32, rounded to fp16) before it is timed; a NaN or a row left unwritten counts as wrong. Times:
``llamatelemetry_core.testing.bench.do_bench_ms`` of a CUDA-graph replay (median, L2 flushed before each
repetition), split-KV merge included. Writes ``results.json`` and ``summary.md`` under
``benchmarks/results/<gpu-slug>/flashattn-paged-decode`` (or ``--out``), prints one line per case last, and exits
with status 1 when the library's launch is more than ``CHOSEN_WITHIN`` slower than the best swept one, or a launch
computes a wrong result.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llamatelemetry_core.kv_layout import PagedKV
from llamatelemetry_core.testing.bench import device_slug, do_bench_ms, envelope, progress, warm_gpu
from llamatelemetry_flashattn import paged_attention
from llamatelemetry_flashattn.paged_kernel import triton_paged_attention
from llamatelemetry_flashattn.paged_tiles import PagedLaunch, PagedTiles, paged_launch_config

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 64, 16
FP16 = torch.float16
CHOSEN_WITHIN = 1.10
"""The library's launch may take at most this multiple of the best swept launch's time in every case."""
MAX_ERROR = 2e-2
MIXED_MIN = 100
"""The shortest sequence of a mixed-length case."""


@dataclass(frozen=True)
class Case:
    name: str
    batch: int
    context: int
    table_pages: int
    short: bool
    mixed: bool = False
    """Lengths uniform in ``MIXED_MIN..context`` (seeded) instead of ``context`` for every sequence."""

    def lengths(self) -> list[int]:
        if not self.mixed:
            return [self.context] * self.batch
        gen = torch.Generator().manual_seed(0)
        return torch.randint(MIXED_MIN, self.context + 1, (self.batch,), generator=gen).tolist()


CASES = [
    Case("short b1", 1, 192, 32, True),
    Case("short b8", 8, 192, 32, True),
    Case("short b64", 64, 192, 32, True),
    Case("long b4 ctx4096", 4, 4096, 256, False),
    Case("long b32 ctx4096", 32, 4096, 256, False),
    Case("long b8 ctx2048", 8, 2048, 128, False),
    Case("long b64 ctx1024", 64, 1024, 64, False),
    Case("mixed b32 100..2048", 32, 2048, 132, False, mixed=True),
    Case("mixed b64 100..2048", 64, 2048, 132, False, mixed=True),
]
SHORT_SPLITS = {1: (1, 2, 4, 8), 8: (1, 2, 4), 64: (1, 2)}


class Store:
    """``batch`` sequences of ``case.lengths()`` tokens in shuffled pages, a table ``table_pages`` wide, one query
    each."""

    def __init__(self, case: Case, seed: int = 0) -> None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        lengths = case.lengths()
        pages = [-(-n // PAGE) for n in lengths]
        if max(pages) > case.table_pages:
            raise ValueError(f"{case.name}: {max(pages)} pages per sequence do not fit a table of {case.table_pages}")
        blocks = sum(pages) + 1
        shape = (blocks, PAGE, KV_HEADS, HEAD_DIM)
        self.kv = PagedKV(
            torch.randn(shape, device="cuda", dtype=FP16, generator=gen),
            torch.randn(shape, device="cuda", dtype=FP16, generator=gen),
        )
        order = torch.randperm(blocks, device="cuda", generator=gen).to(torch.int32)
        self.block_tables = torch.zeros(case.batch, case.table_pages, dtype=torch.int32, device="cuda")
        start = 0
        for i, n in enumerate(pages):
            self.block_tables[i, :n] = order[start : start + n]
            start += n
        self.seq_lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        self.cu_seqlens_q = torch.arange(case.batch + 1, dtype=torch.int32, device="cuda")
        self.q = torch.randn(case.batch, HEADS, HEAD_DIM, device="cuda", dtype=FP16, generator=gen)
        self.out = torch.empty_like(self.q)

    def run(self, launch: PagedLaunch) -> torch.Tensor:
        return triton_paged_attention(
            self.q,
            self.kv,
            self.block_tables,
            self.seq_lens,
            self.cu_seqlens_q,
            max_seqlen_q=1,
            causal=True,
            out=self.out,
            launch=launch,
        )

    def reference(self) -> torch.Tensor:
        return paged_attention(
            self.q, self.kv, self.block_tables, self.seq_lens, self.cu_seqlens_q, max_seqlen_q=1, backend="reference"
        )


def label(launch: PagedLaunch) -> str:
    t = launch.tiles
    ids = " ids" if t.page_ids else ""
    return f"{t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}{ids}, {launch.num_splits} split(s)"


def candidates(case: Case, chosen: PagedLaunch) -> list[PagedLaunch]:
    launches = [chosen]
    if case.short:
        for block_n, warps in ((32, 2), (32, 4), (64, 2), (64, 4), (128, 4), (128, 8)):
            for stages in (1, 2, 3, 4):
                for ids in (False, True):
                    tiles = PagedTiles(16, block_n, HEAD_DIM, warps, stages, ids)
                    launches += [PagedLaunch(tiles, s) for s in SHORT_SPLITS[case.batch]]
    else:
        for block_n in (64, 128):
            for stages in (1, 2, 3, 4, 5, 6):
                launches.append(PagedLaunch(PagedTiles(16, block_n, HEAD_DIM, 4, stages, True), chosen.num_splits))
        launches.append(PagedLaunch(PagedTiles(16, 128, HEAD_DIM, 4, 3, False), chosen.num_splits))
    unique: list[PagedLaunch] = []
    for launch in launches:
        if launch not in unique:
            unique.append(launch)
    return unique


def sweep_case(case: Case) -> dict[str, Any]:
    store = Store(case)
    want = store.reference().float()
    chosen = paged_launch_config(store.q, store.kv, store.block_tables, 1)
    rows: list[dict[str, Any]] = []
    for launch in candidates(case, chosen):
        row: dict[str, Any] = {"launch": label(launch), "chosen": launch == chosen, "ms": None, "error": None}
        try:
            store.out.fill_(float("nan"))
            err = (store.run(launch).float() - want).abs().max().item()
            if not err <= MAX_ERROR:  # NaN included
                row["error"] = f"wrong result: max |error| {err:.3g}"
            else:
                row["ms"] = do_bench_ms(functools.partial(store.run, launch), graph=True)
        except Exception as exc:  # a launch that does not fit (shared memory, registers) is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        rows.append(row)
    del store
    gc.collect()
    timed = [r for r in rows if r["ms"] is not None]
    best = min(timed, key=lambda r: r["ms"]) if timed else {"launch": "none ran", "ms": None}
    mine = next(r for r in rows if r["chosen"])
    ratio = mine["ms"] / best["ms"] if mine["ms"] is not None and best["ms"] is not None else None
    return {
        "case": case.name,
        "batch": case.batch,
        "context": case.context,
        "max_kv_len": case.table_pages * PAGE,
        "rows": rows,
        "best": best,
        "chosen": mine,
        "chosen_vs_best": ratio,
        "wrong": [r for r in rows if r["error"] and r["error"].startswith("wrong")],
    }


def summary(results: dict[str, Any]) -> str:
    lines = [
        f"# Paged decode at the engine's shape on {results['benchmark']['environment'].get('gpu', 'this GPU')}",
        "",
        f"{HEADS} query / {KV_HEADS} KV heads, head dim {HEAD_DIM}, fp16, pages of {PAGE}, one query per sequence;"
        " CUDA-graph replay, median, L2 flushed (`sweep_paged_decode.py`).",
        "",
        "| case | keys bound | library's launch | us | best swept launch | us | library / best |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in results["cases"]:
        mine, best = c["chosen"], c["best"]
        mine_us = f"{mine['ms'] * 1e3:.2f}" if mine["ms"] is not None else mine["error"]
        ratio = f"{c['chosen_vs_best']:.3f}x" if c["chosen_vs_best"] is not None else "-"
        best_us = f"{best['ms'] * 1e3:.2f}" if best["ms"] is not None else "-"
        cells = [c["case"], str(c["max_kv_len"]), mine["launch"], mine_us, best["launch"], best_us, ratio]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "The table's row before 2026-12-01 (128 keys, 3 stages, an id per key) in each case:", ""]
    for c in results["cases"]:
        old = [r for r in c["rows"] if r["launch"].startswith("16x128 w4 s3,") and r["ms"] is not None]
        if old:
            times = ", ".join(f"{r['launch']}: {r['ms'] * 1e3:.2f} us" for r in old)
            lines.append(f"- {c['case']}: {times}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="default: results/<gpu-slug>/flashattn-paged-decode")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_paged_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    out_dir = args.out or Path(__file__).resolve().parents[1] / "results" / device_slug() / "flashattn-paged-decode"
    results: dict[str, Any] = {"benchmark": envelope("flashattn"), "cases": []}
    results["benchmark"]["environment"]["gpu"] = torch.cuda.get_device_name()
    warm_gpu()
    for case in CASES:
        progress(f"{case.name}: sweeping")
        results["cases"].append(sweep_case(case))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    text = summary(results)
    (out_dir / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    failed = [c["case"] for c in results["cases"] if c["wrong"]]
    slow = [c["case"] for c in results["cases"] if c["chosen_vs_best"] is None or c["chosen_vs_best"] > CHOSEN_WITHIN]
    if failed:
        print(f"wrong results in: {', '.join(failed)}", file=sys.stderr)
    if slow:
        print(f"the library's launch is over {CHOSEN_WITHIN}x the best in: {', '.join(slow)}", file=sys.stderr)
    return 1 if failed or slow else 0


if __name__ == "__main__":
    sys.exit(main())
