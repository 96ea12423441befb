"""Where one decode step of the engine spends its time, on one CUDA GPU.

Usage (from the repository root, no installs):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/engine/profile_decode.py [--batches 1 64]

Random weights in the shape of Llama-3.2-1B (fp16), context 192 per sequence. For each batch size:

1. ``step ms``: wall time of one decode step inside ``LLM.generate`` (a 64-token run minus a 1-token run), the
   figure the engine benchmark divides into tokens/s;
2. ``graph ms``: GPU time of replaying the captured decode graph alone (inputs already in place);
3. ``roofline ms``: the weight and KV bytes the step must read over the copy bandwidth of this run;
4. the device time of each kernel of one eager decode step (``torch.profiler``), grouped, so the gap between
   graph and roofline has names;
5. the host functions that take the most time in a decode-heavy ``generate`` (``cProfile``), for the gap between
   step and graph.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from llamatelemetry_core.kv_layout import PAD_BLOCK
from llamatelemetry_core.testing.bench import copy_gbps, gpu_ms
from llamatelemetry_engine import LLM, PRESETS, SamplingParams, random_weights

CONTEXT = 192


def wall(fn: Any) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def category(name: str) -> str:
    low = name.lower()
    for key, label in (
        ("paged", "paged attention"),
        ("attn", "attention"),
        ("write", "kv write"),
        ("rms", "norm"),
        ("norm", "norm"),
        ("rope", "rope"),
        ("swiglu", "swiglu"),
        ("gemv", "matmul"),
        ("gemm", "matmul"),
        ("cutlass", "matmul"),
        ("xmma", "matmul"),
        ("sm90", "matmul"),
        ("splitk", "matmul"),
        ("linear_kernel", "matmul"),  # llamatelemetry-triton's few-row and small-M projections
        ("small_m", "matmul"),
        ("embedding", "embedding"),
        ("index", "embedding"),
        ("copy", "copy/cast"),
        ("elementwise", "elementwise"),
    ):
        if key in low:
            return label
    return "other"


def decode_inputs(llm: LLM, batch: int) -> list[torch.Tensor]:
    runner = llm.runner
    page = runner.page_size
    assert page is not None and runner.graphs is not None
    width = runner.graphs.width
    per_seq = -(-(CONTEXT + 1) // page)
    num_blocks = runner.cache.block_manager.num_blocks  # type: ignore[union-attr]
    if batch * per_seq > num_blocks:
        raise SystemExit(f"profile needs {batch * per_seq} blocks, the cache has {num_blocks}")
    table = torch.full((batch, width), PAD_BLOCK, dtype=torch.int32)
    for i in range(batch):
        table[i, :per_seq] = torch.arange(i * per_seq, (i + 1) * per_seq, dtype=torch.int32)
    slots = table[:, CONTEXT // page].long() * page + CONTEXT % page
    dev = runner.device
    return [
        torch.randint(10, llm.config.vocab_size - 10, (batch,), device=dev),
        torch.full((batch,), CONTEXT, dtype=torch.long, device=dev),
        slots.to(dev),
        table.to(dev),
        torch.full((batch,), CONTEXT + 1, dtype=torch.int32, device=dev),
    ]


def kernel_table(llm: LLM, inputs: list[torch.Tensor]) -> list[tuple[str, float, int]]:
    graphs = llm.runner.graphs
    with torch.inference_mode():
        for _ in range(3):
            graphs._decode(*inputs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                graphs._decode(*inputs)
            torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for evt in prof.key_averages():
        device_us = float(getattr(evt, "device_time_total", 0.0) or getattr(evt, "cuda_time_total", 0.0))
        if device_us <= 0 or evt.key.startswith("aten::"):
            continue
        totals[evt.key] += device_us / 5
        counts[evt.key] += evt.count // 5
    return sorted(((k, v, counts[k]) for k, v in totals.items()), key=lambda r: -r[1])


def replay_and_eager_ms(llm: LLM, inputs: list[torch.Tensor]) -> tuple[float, float]:
    graphs = llm.runner.graphs
    with torch.inference_mode():
        return gpu_ms(lambda: graphs.buckets(*inputs)), gpu_ms(lambda: graphs._decode(*inputs), reps=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode: needs a CUDA GPU", file=sys.stderr)
        return 2
    loaded = random_weights(PRESETS["llama-3.2-1b"], seed=0, dtype=torch.float16)
    c = loaded.config
    bandwidth = copy_gbps() * 1e9
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}; copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    summary = []
    for batch in args.batches:
        llm = LLM(loaded, device="cuda", max_model_len=512, max_batch_size=max(args.batches))
        gen = torch.Generator().manual_seed(batch)
        ps = [torch.randint(10, c.vocab_size - 10, (128,), generator=gen).tolist() for _ in range(batch)]

        def run(n: int, llm: LLM = llm, ps: list[list[int]] = ps) -> Any:
            return llm.generate(ps, SamplingParams(max_tokens=n, ignore_eos=True))

        run(64)
        step = (min(wall(lambda: run(64)) for _ in range(2)) - min(wall(lambda: run(1)) for _ in range(2))) / 63
        inputs = decode_inputs(llm, batch)
        graph, eager = replay_and_eager_ms(llm, inputs)
        weights = c.num_parameters() * 2
        kv = batch * (CONTEXT + 1) * c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2
        roof = (weights + kv) / bandwidth * 1e3
        rows = kernel_table(llm, inputs)
        groups: dict[str, float] = defaultdict(float)
        launches = 0
        for name, us, n in rows:
            groups[category(name)] += us
            launches += n
        print(f"\n== batch {batch}: step {step * 1e3:.3f} ms, graph {graph:.3f} ms, eager {eager:.3f} ms, "
              f"roofline {roof:.3f} ms; {launches} kernels per step", flush=True)  # fmt: skip
        print("  by group (us per step): " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(groups.items(),
              key=lambda kv: -kv[1])))  # fmt: skip
        for name, us, n in rows[:18]:
            print(f"  {us:8.1f} us {n:4d}x  {name[:110]}")
        prof = cProfile.Profile()
        prof.enable()
        run(32)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(22)
        print("\n".join(line for line in text.getvalue().splitlines()[6:40] if line.strip()), flush=True)
        summary.append((batch, step * 1e3, graph, eager, roof, sum(groups.values()) / 1e3))
        del llm, inputs
        torch.cuda.empty_cache()
    print("\n| batch | step ms | graph ms | eager ms | kernel sum ms | roofline ms | graph/roofline | step/roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, step_ms, graph, eager, roof, ksum in summary:
        print(f"| {batch} | {step_ms:.3f} | {graph:.3f} | {eager:.3f} | {ksum:.3f} | {roof:.3f} | "
              f"{roof / graph:.0%} | {roof / step_ms:.0%} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
