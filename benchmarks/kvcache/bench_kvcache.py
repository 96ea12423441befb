"""Benchmark of llamatelemetry-kvcache: update cost against context, block-manager host time, paged memory, write
bandwidth, and the accuracy cost of int8/fp8 KV.

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/kvcache/bench_kvcache.py \\
        --out benchmarks/results/<gpu-slug>/kvcache

Cases (each target is judged in the run, against a baseline measured in the same run):

* ``KVCache.update`` of one token per sequence (batch 8, 8 KV heads of 128, fp16) at context 4096 against
  context 16, on the host path (eager, as a Python decode loop calls it) and on the graph-safe path replayed from
  a CUDA graph: target <= 1.2x.
* Block manager host time per scheduler step: 256 running sequences (prompts of 64..4096 tokens, page 16), each
  step appends one token to every sequence, and every 8th step one sequence finishes and a new 512-token prompt
  sharing a 256-token system prompt takes its place: target < 100 us per step through the protocol calls the
  continuous-batching scheduler makes (``append`` for a sequence whose last block is full, one ``append_decode``
  for all the others), reported beside ``append`` per sequence, ``can_append`` + ``append`` per sequence,
  ``append_many`` and the block-table tensor build.
  Runs on a CPU too.
* Memory: ``PagedKVCache`` holding 64 sequences of mixed lengths (64..4096) against the KV bytes their tokens
  need and against a ``KVCache`` sized for the longest: target <= 1.1x the need.
* The paged write kernel (Triton) against the PyTorch reference, in GB/s and as a share of the device-to-device
  copy of the same bytes, measured in the same run; fp16, int8 and (where the GPU has it) fp8 storage.
* Accuracy cost of quantized KV: attention output (SDPA, fp32) over dequantized K/V against fp16 K/V.

The reference write is timed eagerly (its boolean mask synchronises with the host), the kernel from a CUDA graph.
Results: ``results.json`` and ``results.md`` in ``--out``; a short table printed last.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llamatelemetry_core.testing.bench import copy_gbps, device_slug, do_bench_ms, envelope, progress
from llamatelemetry_kvcache import BlockManager, KVCache, KVCacheConfig, PagedKVCache, dequantize_kv, quantize_kv
from llamatelemetry_kvcache.metadata import BlockTableBuilder, block_tables_tensor
from llamatelemetry_kvcache.paged_write import paged_write

FP16 = torch.float16
KV_HEADS, HEAD_DIM = 8, 128


@dataclass
class Row:
    case: str
    value: str
    detail: str = ""


@dataclass
class Check:
    target: str
    measured: str
    passed: bool | None


@dataclass
class Report:
    device: dict[str, Any]
    versions: dict[str, str]
    rows: list[Row] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


def _copy_gbps(nbytes: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written) at ``nbytes`` moved, measured now the way the kernel
    beside it is: a CUDA-graph replay timed by ``triton.testing.do_bench``."""
    return copy_gbps(buffer_bytes=max(nbytes // 2, 1), time_ms=functools.partial(do_bench_ms, graph=True))


# --- KVCache.update against context ---------------------------------------------------------------------------


def bench_update(report: Report) -> None:
    batch = 8
    config = KVCacheConfig(batch, 4096 + 16, 1, 32, HEAD_DIM, FP16, num_kv_heads=KV_HEADS)
    cache = KVCache(config)
    k = torch.randn(batch, 1, KV_HEADS, HEAD_DIM, device="cuda", dtype=FP16)
    v = torch.randn_like(k)
    eager, graphed = {}, {}
    for ctx in (16, 4096):
        positions = [ctx] * batch
        eager[ctx] = do_bench_ms(lambda p=positions: cache.update(0, k, v, positions=p))  # type: ignore[misc]
        device_positions = torch.full((batch,), ctx, device="cuda")
        graphed[ctx] = do_bench_ms(lambda p=device_positions: cache.update(0, k, v, positions=p), graph=True)  # type: ignore[misc]
        report.rows.append(
            Row(
                f"KVCache.update, 1 token x {batch}, context {ctx}",
                f"{eager[ctx] * 1e3:.1f} us eager",
                f"{graphed[ctx] * 1e3:.2f} us GPU (graph-safe path, replayed)",
            )
        )
    ratio, gratio = eager[4096] / eager[16], graphed[4096] / graphed[16]
    report.checks.append(
        Check("update at context 4096 <= 1.2x context 16", f"{ratio:.2f}x eager, {gratio:.2f}x GPU", ratio <= 1.2)
    )


# --- block manager host time ------------------------------------------------------------------------------------


def bench_block_manager(report: Report, steps: int = 2000) -> None:
    rng = random.Random(0)
    page, running = 16, 256
    system = [rng.randrange(32000) for _ in range(256)]

    def fresh() -> tuple[BlockManager, list[int]]:
        manager = BlockManager(running * (4096 + 1024) // page + 1024, page)
        ids = list(range(running))
        for s in ids:
            manager.allocate(s, [rng.randrange(32000) for _ in range(rng.randrange(64, 4097))])
        return manager, ids

    def run(manager: BlockManager, ids: list[int], mode: str) -> list[float]:
        next_id, times = running, []
        held = {s: manager.num_tokens(s) for s in ids}  # what the scheduler knows of each sequence
        for step in range(steps):
            if mode == "decode":
                # The scheduler's own bookkeeping (untimed): which sequences have a full last block.
                alone = [s for s in ids if held[s] % page == 0]
                batch = [s for s in ids if held[s] % page]
                tokens = [step] * len(batch)
                for s in ids:
                    held[s] += 1
            t0 = time.perf_counter()
            if mode == "decode":
                # The scheduler's path: a sequence whose last block is full appends alone (it may need to preempt
                # another); every other one is appended in one append_decode call.
                for s in alone:
                    manager.append(s, [step])
                manager.append_decode(batch, tokens)
            elif mode == "many":
                manager.append_many([(s, [step]) for s in ids])
            elif mode == "ask":
                for s in ids:
                    if manager.can_append(s, 1):
                        manager.append(s, [step])
            else:  # the scheduler's pattern: append, and ask only when an append fails (a failed call changes nothing)
                for s in ids:
                    manager.append(s, [step])
            if step % 8 == 7:  # one sequence finishes; a new prompt with a shared system prompt joins
                done = ids.pop(step % len(ids))
                manager.free(done)
                prompt = system + [rng.randrange(32000) for _ in range(256)]
                if manager.can_allocate(prompt):
                    manager.allocate(next_id, prompt)
                    ids.append(next_id)
                    held[next_id] = len(prompt)
                    next_id += 1
            times.append(time.perf_counter() - t0)
        return times

    scheduled = statistics.median(run(*fresh(), mode="decode")) * 1e6
    per_step = statistics.median(run(*fresh(), mode="append")) * 1e6
    asking = statistics.median(run(*fresh(), mode="ask")) * 1e6
    batched = statistics.median(run(*fresh(), mode="many")) * 1e6
    manager, ids = fresh()
    t0 = time.perf_counter()
    for _ in range(20):
        block_tables_tensor(manager, ids)
    rebuild_us = (time.perf_counter() - t0) / 20 * 1e6
    builder = BlockTableBuilder(manager, 4096 // page + 64)
    builder.build(ids)
    incremental = []
    for step in range(200):  # a decode step appends a token to each sequence, then the tables are rebuilt
        manager.append_many([(s, [step]) for s in ids])
        t0 = time.perf_counter()
        builder.build(ids)
        incremental.append(time.perf_counter() - t0)
    tables_us = statistics.median(incremental) * 1e6
    stats = manager.stats()
    report.rows.append(
        Row(
            "block manager step, 256 sequences (the scheduler's path: append_decode, append at block ends)",
            f"{scheduled:.0f} us",
        )
    )
    report.rows.append(Row("block manager step, 256 sequences (append each)", f"{per_step:.0f} us"))
    report.rows.append(Row("block manager step, 256 sequences (can_append + append each)", f"{asking:.0f} us"))
    report.rows.append(Row("block manager step, 256 sequences (append_many)", f"{batched:.0f} us"))
    report.rows.append(
        Row(
            "block tables [256, max blocks] + seq lens as int32 tensors (incremental builder)",
            f"{tables_us:.0f} us",
            f"rebuilt from lists: {rebuild_us:.0f} us; waste {stats.waste_fraction:.2%} of held slots",
        )
    )
    report.checks.append(
        Check(
            "block manager host time per step, 256 sequences < 100 us",
            f"{scheduled:.0f} us (append each {per_step:.0f} us, can_append + append {asking:.0f} us, "
            f"append_many {batched:.0f} us)",
            scheduled < 100,
        )
    )


# --- memory ----------------------------------------------------------------------------------------------------


def bench_memory(report: Report) -> None:
    rng = random.Random(1)
    lengths = [rng.randrange(64, 4097) for _ in range(64)]
    lengths[0] = 4096
    config = KVCacheConfig(64, 4096, 32, 32, HEAD_DIM, FP16, num_kv_heads=KV_HEADS, device="cpu")
    need = sum(lengths) * config.bytes_per_token() * config.num_layers
    page = 16
    blocks = sum(-(-n // page) for n in lengths)
    manager = BlockManager(blocks, page)
    for s, n in enumerate(lengths):
        manager.allocate(s, list(range(s * 10_000, s * 10_000 + n)))  # distinct prompts: no sharing
    held = manager.stats().used * page * config.bytes_per_token() * config.num_layers
    measured = None
    if torch.cuda.is_available():
        gpu_config = KVCacheConfig(64, 4096, 32, 32, HEAD_DIM, FP16, num_kv_heads=KV_HEADS)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        paged = PagedKVCache(gpu_config, page, num_blocks=blocks)
        measured = torch.cuda.memory_allocated() - before
        del paged
        torch.cuda.empty_cache()
    contiguous = config.nbytes()
    ratio = held / need
    report.rows.append(
        Row(
            "PagedKVCache, 64 sequences of 64..4096 tokens (32 layers, 8x128 fp16)",
            f"{held / 2**30:.2f} GiB held, {need / 2**30:.2f} GiB needed",
            f"KVCache for the longest: {contiguous / 2**30:.2f} GiB ({contiguous / need:.2f}x)"
            + ("" if measured is None else f"; allocated on the GPU: {measured / 2**30:.2f} GiB"),
        )
    )
    report.checks.append(Check("paged memory <= 1.1x the KV bytes needed", f"{ratio:.3f}x", ratio <= 1.1))


# --- write kernel ----------------------------------------------------------------------------------------------


def bench_write(report: Report) -> None:
    fp8 = getattr(torch, "float8_e4m3fn", None)
    kinds: list[torch.dtype] = [FP16, torch.int8]
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if fp8 is not None and (props.major, props.minor) >= (8, 9):
        kinds.append(fp8)
    for tokens in (256, 8192):
        for kv_dtype in kinds:
            _write_case(report, tokens, kv_dtype)


def _write_case(report: Report, tokens: int, kv_dtype: torch.dtype) -> None:
    storage = None if kv_dtype == FP16 else kv_dtype
    config = KVCacheConfig(1, 1, 1, 32, HEAD_DIM, FP16, num_kv_heads=KV_HEADS, kv_dtype=storage)
    paged = PagedKVCache(config, 16, num_blocks=tokens // 16 + 16)
    store = paged.layer(0)
    key = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=FP16)
    value = torch.randn_like(key)
    slots = torch.randperm(tokens, device="cuda")  # scattered blocks, as after many steps
    item = store.key_cache.element_size()
    scales = 2 * tokens * KV_HEADS * 4 if item == 1 else 0
    nbytes = 2 * tokens * KV_HEADS * HEAD_DIM * (2 + item) + scales  # K and V read as fp16, written as stored
    copy = _copy_gbps(nbytes)
    # The reference indexes with a boolean mask (a host synchronisation): it is timed eagerly.
    kernel_ms = do_bench_ms(lambda: paged_write(key, value, store, slots, backend="triton"), graph=True)
    reference_ms = do_bench_ms(lambda: paged_write(key, value, store, slots, backend="reference"))
    gbps = nbytes / kernel_ms / 1e6
    name = str(kv_dtype).removeprefix("torch.")
    report.rows.append(
        Row(
            f"paged write {tokens} tokens -> {name}",
            f"{kernel_ms * 1e3:.1f} us, {gbps:.0f} GB/s ({gbps / copy:.0%} of copy)",
            f"reference {reference_ms * 1e3:.1f} us eager ({reference_ms / kernel_ms:.1f}x)",
        )
    )
    if tokens == 8192:
        report.checks.append(
            Check(f"write kernel, 8192 tokens -> {name}: share of copy bandwidth", f"{gbps / copy:.0%}", None)
        )


# --- accuracy of quantized KV ------------------------------------------------------------------------------------


def bench_accuracy(report: Report) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 32, 1, HEAD_DIM, generator=gen)
    k = torch.randn(4, KV_HEADS, 2048, HEAD_DIM, generator=gen).half()
    v = torch.randn(4, KV_HEADS, 2048, HEAD_DIM, generator=gen).half()
    ref = F.scaled_dot_product_attention(q, k.float(), v.float(), enable_gqa=True)
    for kv_dtype in (torch.int8, getattr(torch, "float8_e4m3fn", None)):
        if kv_dtype is None:
            continue
        kd = dequantize_kv(*quantize_kv(k, kv_dtype), torch.float32)
        vd = dequantize_kv(*quantize_kv(v, kv_dtype), torch.float32)
        out = F.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)
        err = (out - ref).abs()
        name = str(kv_dtype).removeprefix("torch.")
        report.rows.append(
            Row(
                f"attention output error, {name} KV vs fp16 KV (context 2048)",
                f"max {err.max().item():.2e}, mean {err.mean().item():.2e}",
                f"output scale {ref.abs().mean().item():.2e}",
            )
        )


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    try:
        import triton

        out["triton"] = getattr(triton, "__version__", "unknown")
    except ImportError:
        out["triton"] = "not installed"
    return out


def _device() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"name": "cpu (" + (platform.processor() or platform.machine()) + ")"}
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
    }


def _markdown(report: Report) -> str:
    lines = [
        f"# llamatelemetry-kvcache on {report.device['name']}",
        "",
        ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        "",
    ]
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for c in report.checks:
        lines.append(
            f"| {c.target} | {c.measured} | {'n/a' if c.passed is None else ('yes' if c.passed else '**no**')} |"
        )
    lines += ["", "## Measurements", "", "| case | value | detail |", "|---|---|---|"]
    lines += [f"| {r.case} | {r.value} | {r.detail} |" for r in report.rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="folder (default: results/<device-slug>/kvcache)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = Report(device=_device(), versions=_versions())
    progress("block manager host time per step")
    bench_block_manager(report)
    progress("paged memory")
    bench_memory(report)
    progress("quantized-KV accuracy")
    bench_accuracy(report)
    if torch.cuda.is_available():
        progress("cache update against context")
        bench_update(report)
        progress("write-kernel bandwidth")
        bench_write(report)
    else:
        print("bench_kvcache: no CUDA GPU; the update and write-kernel cases are skipped", file=sys.stderr)
    out = args.out or Path(__file__).resolve().parents[1] / "results" / device_slug() / "kvcache"
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": envelope("kvcache")} | asdict(report) | {"seconds": round(time.perf_counter() - started, 1)}
    (out / "results.json").write_text(json.dumps(payload, indent=2), encoding="utf-8")
    (out / "results.md").write_text(_markdown(report), encoding="utf-8")
    print(f"\nwrote {out / 'results.json'} and results.md in {payload['seconds']} s on {report.device['name']}\n")
    for r in report.rows:
        print(f"{r.case:<72} {r.value}  {r.detail}")
    print()
    for c in report.checks:
        print(f"{c.target:<62} {c.measured:<40} {'n/a' if c.passed is None else ('yes' if c.passed else 'NO')}")
    missed = [c.target for c in report.checks if c.passed is False]
    if missed:
        print(f"missed targets: {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
