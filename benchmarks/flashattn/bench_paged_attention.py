"""Paged attention (``paged_attention``) on one GPU, against baselines measured in the same run.

Usage (no network, no installs; from the repository root):

    PYTHONPATH=packages/llamatelemetry-core/src:packages/llamatelemetry-flashattn/src \\
        python benchmarks/flashattn/bench_paged_attention.py [--out DIR] [--no-sweep]

Every time is the median of ``triton.testing.do_bench`` (L2 flushed before each repetition) over a CUDA-graph
replay of the call, so host work is excluded, as in a graph-captured decode loop. fp16; 32 query heads over 8 KV
heads, head dim 128; blocks shuffled across the pool, as a long-running server leaves them.

Targets (exit status 1 when one is missed):

1. decode, batch 32, context 4096, page size 16: K+V bytes read per second >= 85% of the device-to-device copy
   bandwidth (bytes read + written, 1 GiB, the fastest of a graph-captured ``copy_``, an eager ``copy_`` and an
   elementwise copy kernel) measured in this run; >= 0.9x the time of flashattn's own contiguous decode
   (``flash_attention_forward`` on ``[32, 4096, 8, 128]`` K/V); >= 3x "gather the pages to contiguous, then SDPA".
2. chunked prefill, 512 new tokens over a cached prefix of 2048 (batch 4): >= 0.8x flashattn's contiguous causal
   attention on the same work.

Reported without a target: page size 64; ragged lengths 128..4096; int8 KV (bytes read halve; time and error
against fp16 KV); and, unless ``--no-sweep``, a sweep of tiles, warps, stages, the per-page block-id address
path ("ids") and split counts for decode (batch 32 and batch 4) and prefill, with the configuration the library
chose marked, so one run says which is best (the whole script takes about a minute and a half on an H200).
Writes ``results.json`` and ``summary.md`` into DIR (default ``benchmarks/results/<gpu-slug>/flashattn-paged``)
and prints a short table last.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import triton

from llamatelemetry_core.kv_layout import PagedKV
from llamatelemetry_core.selection import record_selections
from llamatelemetry_core.testing import bench
from llamatelemetry_core.testing.bench import device_slug, do_bench_ms, envelope, progress, warm_gpu
from llamatelemetry_flashattn import flash_attention_forward, paged_attention
from llamatelemetry_flashattn.paged_kernel import triton_paged_attention
from llamatelemetry_flashattn.paged_tiles import PagedLaunch, PagedTiles, paged_launch_config

COPY_FRACTION_MIN = 0.85
VS_CONTIGUOUS_MIN = 0.9
VS_GATHER_SDPA_MIN = 3.0
PREFILL_VS_CONTIGUOUS_MIN = 0.8
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
FP16 = torch.float16
COPY_BYTES = 1 << 30  # the copy's source buffer: 8x an H200's L2


def copy_gbps() -> dict[str, float]:
    """Device-to-device copy of 1 GiB (8x an H200's L2), bytes read + written, GB/s, three ways.

    ``copy_`` captured in a CUDA graph becomes a memcpy node, which the driver may run on a copy engine slower
    than the SMs; the same ``copy_`` launched eagerly and an elementwise kernel (``mul(src, 1)``, exact) in a graph
    are measured too. The ceiling (key ``"max"``) is the fastest of the three: the bandwidth kernels can reach.
    """
    replayed = functools.partial(do_bench_ms, graph=True)
    result = {
        "graph_copy": bench.copy_gbps(buffer_bytes=COPY_BYTES, time_ms=replayed),
        "eager_copy": bench.copy_gbps(buffer_bytes=COPY_BYTES, time_ms=do_bench_ms),
        "graph_kernel_copy": bench.copy_gbps(buffer_bytes=COPY_BYTES, kernel=True, time_ms=replayed),
    }
    result["max"] = max(result.values())
    return result


class Paged:
    """A paged store holding ``seq_lens`` tokens per sequence in shuffled blocks, and one step's metadata."""

    def __init__(
        self, seq_lens: list[int], q_lens: list[int], page_size: int, kv_dtype: torch.dtype = FP16, seed: int = 0
    ) -> None:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        needed = [-(-n // page_size) for n in seq_lens]
        num_blocks = sum(needed) + 1
        shape = (num_blocks, page_size, KV_HEADS, HEAD_DIM)
        k = torch.randn(shape, device="cuda", dtype=FP16, generator=gen)
        v = torch.randn(shape, device="cuda", dtype=FP16, generator=gen)
        if kv_dtype == torch.int8:
            ks = (k.float().abs().amax(-1) / 127).clamp_min(1e-8)
            vs = (v.float().abs().amax(-1) / 127).clamp_min(1e-8)
            kq = (k.float() / ks[..., None]).round().clamp(-127, 127).to(torch.int8)
            vq = (v.float() / vs[..., None]).round().clamp(-127, 127).to(torch.int8)
            self.kv = PagedKV(kq, vq, ks, vs)
        else:
            self.kv = PagedKV(k, v)
        self.fp16_kv = PagedKV(k, v)
        order = torch.randperm(num_blocks, device="cuda", generator=gen)
        width = max(needed)
        tables = torch.zeros(len(seq_lens), width, dtype=torch.int32, device="cuda")
        start = 0
        for i, n in enumerate(needed):
            tables[i, :n] = order[start : start + n].to(torch.int32)
            start += n
        self.block_tables = tables
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        self.cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device="cuda")
        self.max_seqlen_q = max(q_lens)
        self.q = torch.randn(cu[-1], HEADS, HEAD_DIM, device="cuda", dtype=FP16, generator=gen)
        self.out = torch.empty_like(self.q)
        self.tokens = sum(seq_lens)

    def kv_bytes(self) -> int:
        """K and V bytes (scales included) the sequences' tokens occupy: what one call reads at least."""
        scale_bytes = 4 if self.kv.key_scale is not None else 0
        per_token = 2 * KV_HEADS * (HEAD_DIM * self.kv.key_cache.element_size() + scale_bytes)
        return self.tokens * per_token

    def run(self, launch: PagedLaunch | None = None) -> torch.Tensor:
        if launch is None:
            return paged_attention(
                self.q,
                self.kv,
                self.block_tables,
                self.seq_lens,
                self.cu_seqlens_q,
                max_seqlen_q=self.max_seqlen_q,
                out=self.out,
            )
        return triton_paged_attention(
            self.q,
            self.kv,
            self.block_tables,
            self.seq_lens,
            self.cu_seqlens_q,
            max_seqlen_q=self.max_seqlen_q,
            causal=True,
            out=self.out,
            launch=launch,
        )

    def reference(self, kv: PagedKV | None = None) -> torch.Tensor:
        return paged_attention(
            self.q,
            kv if kv is not None else self.kv,
            self.block_tables,
            self.seq_lens,
            self.cu_seqlens_q,
            max_seqlen_q=self.max_seqlen_q,
            backend="reference",
        )

    def contiguous(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every sequence's K/V gathered to ``[batch, max_len, kv_heads, head_dim]`` (equal lengths only)."""
        index = self.block_tables.long()
        batch, width = index.shape
        page = self.kv.key_cache.shape[1]
        k = self.fp16_kv.key_cache[index].reshape(batch, width * page, KV_HEADS, HEAD_DIM)
        v = self.fp16_kv.value_cache[index].reshape(batch, width * page, KV_HEADS, HEAD_DIM)
        length = int(self.seq_lens.max())
        return k[:, :length].contiguous(), v[:, :length].contiguous()


def describe(launch: PagedLaunch) -> str:
    return f"{tiles_label(launch.tiles)}, {launch.num_splits} split(s)"


def gbps(store: Paged, ms: float) -> float:
    return store.kv_bytes() / (ms * 1e-3) / 1e9


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def gather_then_sdpa(store: Paged) -> Callable[[], torch.Tensor]:
    """The baseline a paged cache without a paged kernel runs: gather every page to contiguous, then SDPA."""
    index = store.block_tables.long()
    batch, width = index.shape
    page = store.kv.key_cache.shape[1]
    q = store.q.view(batch, -1, HEADS, HEAD_DIM).transpose(1, 2)

    def run() -> torch.Tensor:
        k = store.kv.key_cache[index].view(batch, width * page, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = store.kv.value_cache[index].view(batch, width * page, KV_HEADS, HEAD_DIM).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return run


def check(results: dict[str, Any], name: str, value: float, target: float) -> None:
    results["checks"].append({"name": name, "value": value, "target": target, "ok": value >= target})


def bench_decode(results: dict[str, Any], copy: float) -> None:
    batch, context = 32, 4096
    for page_size in (16, 64):
        store = Paged([context] * batch, [1] * batch, page_size)
        with record_selections() as record:
            out = store.run()
        row: dict[str, Any] = {
            "case": f"decode B{batch} ctx{context} page{page_size}",
            "backend": record.last("paged_attention"),
            "launch": describe(paged_launch_config(store.q, store.kv, store.block_tables, 1)),
            "max_error_vs_reference": max_error(out, store.reference()),
            "kv_bytes": store.kv_bytes(),
        }
        warm_gpu()
        row["ms"] = do_bench_ms(store.run, graph=True)
        row["gbps"] = store.kv_bytes() / (row["ms"] * 1e-3) / 1e9
        row["fraction_of_copy"] = row["gbps"] / copy
        if page_size == 16:
            k, v = store.contiguous()
            q4 = store.q.view(batch, 1, HEADS, HEAD_DIM)
            with record_selections() as record:
                contiguous_out = flash_attention_forward(q4, k, v, causal=True)
            row["contiguous_backend"] = record.last("flash_attention")
            row["contiguous_max_error"] = max_error(contiguous_out.view_as(out), out)
            row["contiguous_ms"] = do_bench_ms(
                functools.partial(flash_attention_forward, q4, k, v, causal=True), graph=True
            )
            row["gather_sdpa_ms"] = do_bench_ms(gather_then_sdpa(store), graph=True)
            row["vs_contiguous"] = row["contiguous_ms"] / row["ms"]
            row["vs_gather_sdpa"] = row["gather_sdpa_ms"] / row["ms"]
            check(results, "decode page 16: K+V read / copy bandwidth", row["fraction_of_copy"], COPY_FRACTION_MIN)
            check(results, "decode page 16: vs contiguous flashattn decode", row["vs_contiguous"], VS_CONTIGUOUS_MIN)
            check(results, "decode page 16: vs gather + SDPA", row["vs_gather_sdpa"], VS_GATHER_SDPA_MIN)
            del k, v
            # int8 storage of the same values: bytes halve; report the time and the error against fp16 KV.
            int8 = Paged([context] * batch, [1] * batch, page_size, kv_dtype=torch.int8)
            int8_out = int8.run()
            results["int8"] = {
                "case": f"decode B{batch} ctx{context} page{page_size} int8 KV",
                "kv_bytes": int8.kv_bytes(),
                "ms": do_bench_ms(int8.run, graph=True),
                "fp16_ms": row["ms"],
                "max_error_vs_fp16_kv": max_error(int8_out, int8.reference(int8.fp16_kv)),
                "max_error_vs_own_reference": max_error(int8_out, int8.reference()),
            }
            results["int8"]["gbps"] = int8.kv_bytes() / (results["int8"]["ms"] * 1e-3) / 1e9
            results["int8"]["speedup_vs_fp16"] = row["ms"] / results["int8"]["ms"]
            del int8
        results["decode"].append(row)
        del store
    gen = torch.Generator().manual_seed(7)
    lens = torch.randint(128, 4097, (batch,), generator=gen).tolist()
    store = Paged(lens, [1] * batch, 16)
    row = {"case": f"decode B{batch} ragged 128..4096 page16", "seq_lens": lens, "kv_bytes": store.kv_bytes()}
    row["max_error_vs_reference"] = max_error(store.run(), store.reference())
    row["ms"] = do_bench_ms(store.run, graph=True)
    row["gbps"] = store.kv_bytes() / (row["ms"] * 1e-3) / 1e9
    row["fraction_of_copy"] = row["gbps"] / copy
    results["decode"].append(row)


def causal_flops(batch: int, prefix: int, new: int) -> float:
    keys_seen = sum(prefix + i + 1 for i in range(new))
    return 4.0 * batch * HEADS * HEAD_DIM * keys_seen


def bench_prefill(results: dict[str, Any]) -> None:
    batch, prefix, new = 4, 2048, 512
    store = Paged([prefix + new] * batch, [new] * batch, 16)
    out = store.run()
    k, v = store.contiguous()
    q4 = store.q.view(batch, new, HEADS, HEAD_DIM)
    with record_selections() as record:
        contiguous_out = flash_attention_forward(q4, k, v, causal=True)
    row: dict[str, Any] = {
        "case": f"chunked prefill B{batch} prefix{prefix} new{new} page16",
        "launch": describe(paged_launch_config(store.q, store.kv, store.block_tables, new)),
        "contiguous_backend": record.last("flash_attention"),
        "max_error_vs_contiguous": max_error(contiguous_out.reshape_as(out), out),
    }
    warm_gpu()
    row["ms"] = do_bench_ms(store.run, graph=True)
    row["contiguous_ms"] = do_bench_ms(lambda: flash_attention_forward(q4, k, v, causal=True), graph=True)
    flops = causal_flops(batch, prefix, new)
    row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
    row["contiguous_tflops"] = flops / (row["contiguous_ms"] * 1e-3) / 1e12
    row["vs_contiguous"] = row["contiguous_ms"] / row["ms"]
    check(results, "chunked prefill: vs contiguous flashattn causal", row["vs_contiguous"], PREFILL_VS_CONTIGUOUS_MIN)
    results["prefill"] = row


def sweep_one(store: Paged, want: torch.Tensor, tiles: PagedTiles, splits: int) -> tuple[float | None, str | None]:
    try:
        out = store.run(PagedLaunch(tiles, splits))
        err = max_error(out, want)
        if err > 2e-2:
            return None, f"wrong result (max error {err:.3g})"
        return do_bench_ms(lambda: store.run(PagedLaunch(tiles, splits)), graph=True), None
    except Exception as exc:  # out of shared memory or registers: reported, not fatal
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


# (BLOCK_M, BLOCK_N, warps, stages) swept for decode and prefill, each with and without one block id per page.
SWEEP_DECODE = [(16, 64, 4, 3), (16, 64, 4, 4), (16, 128, 4, 2), (16, 128, 4, 3), (16, 128, 4, 4), (16, 128, 8, 2)]
SWEEP_PREFILL = [
    (64, 64, 4, 3),
    (64, 32, 4, 3),
    (128, 32, 4, 2),
    (128, 32, 4, 3),
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 2),
]
SWEEP_SPLITS = (1, 2, 4, 8, 16)


def tiles_label(tiles: PagedTiles) -> str:
    ids = " ids" if tiles.page_ids else ""
    return f"{tiles.block_m}x{tiles.block_n} w{tiles.num_warps} s{tiles.num_stages}{ids}"


def sweep(results: dict[str, Any], copy: float) -> None:
    rows: list[dict[str, Any]] = []
    cases = [
        ("decode B32 ctx4096", Paged([4096] * 32, [1] * 32, 16), 1),
        ("decode B4 ctx4096", Paged([4096] * 4, [1] * 4, 16), 1),
        ("prefill B4 2048+512", Paged([2560] * 4, [512] * 4, 16), 512),
    ]
    for name, store, max_q in cases:
        chosen = paged_launch_config(store.q, store.kv, store.block_tables, max_q)
        want = store.reference()
        configs: list[tuple[PagedTiles, int]] = []
        for shape in SWEEP_DECODE if max_q == 1 else SWEEP_PREFILL:
            for page_ids in (False, True):
                configs.append((PagedTiles(*shape[:2], HEAD_DIM, *shape[2:], page_ids=page_ids), chosen.num_splits))
        if max_q == 1:
            for splits in SWEEP_SPLITS:
                configs.append((chosen.tiles, splits))
        print(f"sweep: {name}, {len(configs) + 1} launches (each compiles once)", file=sys.stderr, flush=True)
        seen = set()
        for tiles, splits in [(chosen.tiles, chosen.num_splits), *configs]:
            if (tiles, splits) in seen:
                continue
            seen.add((tiles, splits))
            ms, error = sweep_one(store, want, tiles, splits)
            rows.append(
                {
                    "case": name,
                    "tiles": tiles_label(tiles),
                    "splits": splits,
                    "chosen": (tiles, splits) == (chosen.tiles, chosen.num_splits),
                    "ms": ms,
                    "fraction_of_copy": None if ms is None or max_q != 1 else gbps(store, ms) / copy,
                    "error": error,
                }
            )
        del store
    results["sweep"] = rows
    best: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["ms"] is not None and (row["case"] not in best or row["ms"] < best[row["case"]]["ms"]):
            best[row["case"]] = row
    chosen_rows = {r["case"]: r for r in rows if r["chosen"]}
    summary: dict[str, Any] = {}
    for case, b in best.items():
        chosen_ms = chosen_rows.get(case, {}).get("ms")
        summary[case] = {
            "best": b,
            "chosen": chosen_rows.get(case),
            "chosen_vs_best": b["ms"] / chosen_ms if chosen_ms else None,
        }
    results["sweep_best"] = summary


def environment() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {
        "device": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": getattr(triton, "__version__", "unknown"),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def summary(results: dict[str, Any]) -> str:
    env = results["environment"]
    lines = [
        f"# Paged attention on {env['device']} (sm_{env['compute_capability'].replace('.', '')})",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, {env['date']}. CUDA-graph replay timed "
        "with `triton.testing.do_bench` (median, L2 flushed); fp16; 32 q heads / 8 KV heads, head dim 128. "
        f"Copy bandwidth measured here: {results['copy_gbps']:.0f} GB/s (read + written, 1 GiB; the fastest of "
        + ", ".join(f"{k} {v:.0f}" for k, v in results["copy_methods_gbps"].items() if k != "max")
        + ").",
        "",
        "## Decode",
        "",
        "| case | ms | K+V GB/s | % of copy | contiguous ms | gather+SDPA ms | launch |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["decode"]:
        lines.append(
            f"| {row['case']} | {fmt(row['ms'], '.4f')} | {row['gbps']:.0f} | {100 * row['fraction_of_copy']:.1f} | "
            f"{fmt(row.get('contiguous_ms'), '.4f')} | {fmt(row.get('gather_sdpa_ms'), '.4f')} | "
            f"{row.get('launch', '')} |"
        )
    int8 = results.get("int8")
    if int8:
        lines += [
            "",
            f"int8 KV ({int8['case']}): {int8['ms']:.4f} ms vs {int8['fp16_ms']:.4f} ms fp16 "
            f"({int8['speedup_vs_fp16']:.2f}x), {int8['kv_bytes'] / 2**20:.0f} MiB read ({int8['gbps']:.0f} GB/s); "
            f"max |error| vs fp16 KV {int8['max_error_vs_fp16_kv']:.2e}, vs its own dequantized values "
            f"{int8['max_error_vs_own_reference']:.2e}.",
        ]
    pre = results["prefill"]
    lines += [
        "",
        "## Chunked prefill",
        "",
        f"{pre['case']}: {pre['ms']:.3f} ms ({pre['tflops']:.0f} TFLOP/s) vs contiguous "
        f"{pre['contiguous_backend']} {pre['contiguous_ms']:.3f} ms ({pre['contiguous_tflops']:.0f} TFLOP/s): "
        f"{pre['vs_contiguous']:.2f}x; launch {pre['launch']}.",
    ]
    if "sweep" in results:
        lines += ["", "## Sweep", "", "| case | tiles | splits | chosen | ms | % of copy | note |"]
        lines.append("|---|---|---|---|---|---|---|")
        for row in results["sweep"]:
            pct = None if row["fraction_of_copy"] is None else 100 * row["fraction_of_copy"]
            lines.append(
                f"| {row['case']} | {row['tiles']} | {row['splits']} | {'yes' if row['chosen'] else ''} | "
                f"{fmt(row['ms'], '.4f')} | {fmt(pct, '.1f')} | {row['error'] or ''} |"
            )
        lines += ["", "Best per case (chosen / best time):", ""]
        for case, entry in results["sweep_best"].items():
            b = entry["best"]
            ratio = fmt(entry["chosen_vs_best"], ".2f")
            lines.append(
                f"- {case}: best {b['tiles']} splits {b['splits']} at {b['ms']:.4f} ms; chosen runs at {ratio}x"
            )
    lines += ["", "## Checks", ""]
    for c in results["checks"]:
        lines.append(f"- {'PASS' if c['ok'] else 'FAIL'} {c['name']}: {c['value']:.3f} (target >= {c['target']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default: results/<gpu-slug>/flashattn-paged")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep of tiles and split counts")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_paged_attention: needs a CUDA GPU", file=sys.stderr)
        return 2
    start = time.time()
    env = environment()
    out_dir = args.out or Path(__file__).resolve().parents[1] / "results" / device_slug() / "flashattn-paged"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"benchmark": envelope("flashattn-paged"), "environment": env, "checks": [], "decode": []}
    warm_gpu()
    progress("copy bandwidth")
    results["copy_methods_gbps"] = copy_gbps()
    results["copy_gbps"] = results["copy_methods_gbps"]["max"]
    progress("decode")
    bench_decode(results, results["copy_gbps"])
    progress("chunked prefill")
    bench_prefill(results)
    if not args.no_sweep:
        progress("sweep of tiles, warps, stages and split counts")
        try:
            sweep(results, results["copy_gbps"])
        except Exception:  # the sweep informs tuning; a failure there must not hide the targets
            traceback.print_exc()
    results["wall_seconds"] = time.time() - start
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    text = summary(results)
    (out_dir / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'summary.md'} in {results['wall_seconds']:.0f} s")
    table = [f"{'check':<52} {'value':>8} {'target':>7}  met"]
    for c in results["checks"]:
        table.append(f"{c['name']:<52} {c['value']:>8.3f} {c['target']:>7}  {'yes' if c['ok'] else 'NO'}")
    print("\n".join(table))
    return 0 if all(c["ok"] for c in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
