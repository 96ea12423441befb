"""Engine benchmarks of llamatelemetry-engine on one GPU, with transformers and the memory roofline in the same run.

Usage (no network, no installs; from the repository root):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/engine/bench_engine.py [--quick] [--out DIR]

Random weights in the shape of Llama-3.2-1B (hidden 2048, 16 layers, 32 query / 8 KV heads, vocabulary 128256,
tied embeddings), fp16; the GPU machine has no network, and speed does not depend on the values.

1. Decode throughput, prompt 128, 128 new tokens, batch 1 and 64: the engine (every optimization on) against
   transformers (SDPA; dynamic cache, and static cache with transformers' own ``torch.compile``), and against
   the memory roofline: the weight and KV bytes a decode step must read over the copy bandwidth measured in this
   run (bytes read + written by a device-to-device copy / time). Targets: batch 1 >= 60% of the roofline,
   batch 64 >= 70%. Reported per system: end-to-end output tokens/s (prefill included), and for the engine the
   decode-only rate (difference of a 128-token and a 1-token run) that the roofline bounds.
2. Offline throughput on nano-vllm's workload shape: 256 requests, prompt and output lengths uniform in
   100..1024 (seed 0): continuous batching against static batching (fixed batches that wait for their longest
   member), same maximum batch size; output tokens/s. Target: >= 2x. Each schedule runs the workload once untimed
   (a fresh machine compiles kernels and captures graphs then), then ``OFFLINE_RUNS`` times timed: the best is
   reported. Beside them, the ratio the two schedules would reach with every decode step at the memory roofline
   (:func:`offline_floor`). Static batching reads each step's tokens back before it plans the next step, while the
   continuous engine overlaps that host work with the model (``LLM(overlap=True)``, the default on a GPU): the
   section also runs continuous batching with ``overlap=False``, the schedules compared alone. Also continuous
   batching with ``LLM(step_graphs=False)``: steps that carry prompt tokens run eagerly instead of replaying
   graphs, as they do by default.
3. Online latency: requests arriving as a Poisson stream (seed 0) into the continuous-batching engine running
   in a background thread; time to first token and inter-token latency percentiles.

Writes ``results.json`` and ``summary.md`` into DIR (default ``benchmarks/results/<gpu-slug>/engine``) and prints
a short table last.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from llamatelemetry_core.testing.bench import copy_gbps, device_slug, gpu_ms
from llamatelemetry_engine import LLM, PRESETS, EngineFlags, SamplingParams, random_weights
from llamatelemetry_engine.loader import LoadedModel

ROOFLINE_TARGETS = {1: 0.60, 64: 0.70}
CONTINUOUS_TARGET = 2.0


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy (median of 20 after 5, CUDA events)."""
    events = functools.partial(gpu_ms, reps=20, warmup=5, flush_l2=False)  # 1 GiB runs from memory regardless
    return copy_gbps(buffer_bytes=2**30, time_ms=events) * 1e9


def timed(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 10, (length,), generator=gen).tolist() for _ in range(count)]


def step_bytes(loaded: LoadedModel, batch: int, context: float) -> float:
    """Bytes one fp16 decode step reads: every weight once (the embedding only for ``batch`` rows when untied)
    and the K/V of ``context`` tokens per sequence."""
    c = loaded.config
    weights = c.num_parameters() * 2
    if not c.tie_word_embeddings:
        weights -= (c.vocab_size - batch) * c.hidden_size * 2
    kv = batch * context * c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2
    return weights + kv


def engine_decode(llm: LLM, batch: int, prompt_len: int, new_tokens: int) -> dict[str, float]:
    ps = prompts(batch, prompt_len, llm.config.vocab_size)

    def run(n: int) -> Callable[[], Any]:
        return lambda: llm.generate(ps, SamplingParams(max_tokens=n, ignore_eos=True))

    run(new_tokens)()  # warm-up: graph capture, Triton compilation
    full = min(timed(run(new_tokens)) for _ in range(2))
    one = min(timed(run(1)) for _ in range(2))
    return {
        "end_to_end_tokens_per_s": batch * new_tokens / full,
        "decode_tokens_per_s": batch * (new_tokens - 1) / (full - one),
        "prefill_s": one,
    }


def interleaved_decode_ab(
    build: Callable[[str], LLM],
    variants: Sequence[str],
    batches: Sequence[int],
    runs: int,
    greedy: Callable[[LLM], list[list[int]]],
) -> tuple[dict[str, dict[int, list[float]]], bool]:
    """Decode tok/s (prompt 128, 128 new tokens, :func:`engine_decode`) of each engine variant (``build(name)``)
    at each batch size, ``runs`` rounds with the variants interleaved in one process; and whether ``greedy`` (run
    in the first round) gave every variant the same tokens."""
    rates: dict[str, dict[int, list[float]]] = {v: {b: [] for b in batches} for v in variants}
    tokens: dict[str, list[list[int]]] = {}
    for run in range(runs):
        for variant in variants:
            llm = build(variant)
            for batch in batches:
                rates[variant][batch].append(engine_decode(llm, batch, 128, 128)["decode_tokens_per_s"])
                print(run, variant, batch, f"{rates[variant][batch][-1]:.0f} tok/s", flush=True)
            if run == 0:
                tokens[variant] = greedy(llm)
            del llm
            torch.cuda.empty_cache()
    return rates, len({json.dumps(t) for t in tokens.values()}) == 1


def sixteen_prompts_greedy(llm: LLM) -> list[list[int]]:
    """The greedy tokens of sixteen 64-token prompts decoded together, 32 each: what an A/B compares across its
    variants (:func:`interleaved_decode_ab`'s ``greedy``)."""
    prompts = [list(range(100 + i, 164 + i)) for i in range(16)]
    return [list(c.token_ids) for c in llm.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True))]


def decode_ab(
    build: Callable[[LoadedModel, str], LLM],
    variants: Sequence[str],
    batches: Sequence[int],
    runs: int,
    report: tuple[str, str, str, Path | None],
    greedy: Callable[[LLM], list[list[int]]] = sixteen_prompts_greedy,
    tokens_note: str = "32 from sixteen prompts together",
) -> int:
    """An A/B script's run: :func:`interleaved_decode_ab` of ``build(loaded, variant)`` on random weights of
    Llama-3.2-1B's shape (fp16), against the roofline at context 192, written by :func:`write_ab` (``report`` is
    its ``(stem, title, script, out)``) and printed. Returns 0 when every variant gave the same greedy tokens."""
    loaded = random_weights(PRESETS["llama-3.2-1b"], seed=0, dtype=torch.float16)
    bandwidth = copy_bandwidth()
    rates, same = interleaved_decode_ab(functools.partial(build, loaded), variants, batches, runs, greedy)
    roofline = {b: bandwidth / step_bytes(loaded, b, 128 + 64) * b for b in batches}
    stem, title, script, out = report
    print(write_ab(stem, title, script, out, bandwidth, rates, roofline, same, tokens_note))
    return 0 if same else 1


def write_ab(
    stem: str,
    title: str,
    script: str,
    out: Path | None,
    bandwidth: float,
    rates: dict[str, dict[int, list[float]]],
    roofline: dict[int, float],
    same: bool,
    tokens_note: str,
) -> str:
    """Write the A/B of :func:`interleaved_decode_ab` as ``{stem}.md`` and ``{stem}.json`` into ``out`` (default
    ``benchmarks/results/<gpu-slug>/engine``); return the Markdown."""
    runs = len(next(iter(next(iter(rates.values())).values())))
    lines = [
        f"# {title} on {torch.cuda.get_device_name()} (torch {torch.__version__})",
        "",
        f"`benchmarks/engine/{script}`: Llama-3.2-1B shape, fp16, prompt 128, 128 new tokens; copy "
        f"{bandwidth / 1e9:.0f} GB/s; {runs} interleaved runs per variant in one process.",
        "",
        "| variant | batch | decode tok/s (median) | of roofline | runs |",
        "|---|---|---|---|---|",
    ]
    for variant, by_batch in rates.items():
        for batch, values in by_batch.items():
            m = statistics.median(values)
            every = ", ".join(f"{v:.0f}" for v in values)
            lines.append(f"| {variant} | {batch} | {m:,.0f} | {m / roofline[batch]:.1%} | {every} |")
    lines += ["", f"Same greedy tokens ({tokens_note}) with and without: {same}."]
    text = "\n".join(lines) + "\n"
    out_dir = out or Path(__file__).resolve().parents[1] / "results" / device_slug() / "engine"
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"copy_gb_s": bandwidth / 1e9, "roofline_tokens_per_s": roofline, "decode_tokens_per_s": rates,
              "same_greedy_tokens": same}  # fmt: skip
    (out_dir / f"{stem}.md").write_text(text, encoding="utf-8")
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return text


def transformers_decode(loaded: LoadedModel, batch: int, prompt_len: int, new_tokens: int, static: bool) -> float:
    import transformers

    raw = loaded.config.to_hf()
    raw.pop("architectures")
    raw.pop("model_type")
    model: Any = transformers.LlamaForCausalLM(transformers.LlamaConfig(**raw))
    model = model.to(device="cuda", dtype=torch.float16)
    state = {k: v.to("cuda", torch.float16) for k, v in loaded.state_dict.items()}
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state)
    model.eval()
    ids = torch.tensor(prompts(batch, prompt_len, loaded.config.vocab_size), device="cuda")
    kwargs: dict[str, Any] = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    if static:
        # transformers compiles the forward itself for a static cache (its generation_config.compile_config);
        # compiling model.forward by hand as well reuses CUDA-graph outputs across steps and fails.
        kwargs["cache_implementation"] = "static"
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # warm-up (and compilation)
        model.generate(ids, **kwargs)
        seconds = min(timed(lambda: model.generate(ids, **kwargs)) for _ in range(2))
    return batch * new_tokens / seconds


def offline_lengths(count: int) -> list[tuple[int, int]]:
    """(prompt, output) lengths of nano-vllm's workload: uniform in 100..1024, seed 0."""
    rng = random.Random(0)
    return [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(count)]


def offline_floor(
    step_seconds: Callable[[list[int]], float], lengths: Sequence[tuple[int, int]], max_batch: int
) -> dict[str, Any]:
    """Decode time of each schedule when every step costs ``step_seconds(contexts)`` (the running sequences'
    context lengths): the floor the measured ratio is judged against. A request's first token comes from its
    prompt step, so it takes ``output - 1`` decode steps (prompt steps are the same work in every schedule and
    are left out).

    * ``continuous``: ``max_batch`` slots, a finished request's slot taken by the next one in order at once;
    * ``static``: batches of ``max_batch`` in order, each until its longest member finishes, finished members
      dropped from the steps (what :class:`~llamatelemetry_engine.static_batching.StaticBatchEngine` runs);
    * ``static_padded``: the same batches with finished members kept in every step (the classic form, as a
      padded ``generate`` call runs them).
    """
    times = {"continuous": 0.0, "static": 0.0, "static_padded": 0.0}
    steps = dict.fromkeys(times, 0)
    for start in range(0, len(lengths), max_batch):
        batch = lengths[start : start + max_batch]
        for s in range(1, max(o for _, o in batch)):
            times["static"] += step_seconds([p + s for p, o in batch if s < o])
            times["static_padded"] += step_seconds([p + s for p, _ in batch])
            steps["static"] += 1
    steps["static_padded"] = steps["static"]
    waiting = list(lengths)
    running: list[list[int]] = []  # [prompt, output, tokens so far]
    while waiting or running:
        while waiting and len(running) < max_batch:
            p, o = waiting.pop(0)
            running.append([p, o, 1])
        running = [r for r in running if r[2] < r[1]]
        if running:
            times["continuous"] += step_seconds([p + n for p, _, n in running])
            steps["continuous"] += 1
            for r in running:
                r[2] += 1
    return {
        "seconds": times,
        "steps": steps,
        "ratio": times["static"] / times["continuous"],
        "ratio_padded": times["static_padded"] / times["continuous"],
    }


def offline_requests(loaded: LoadedModel, count: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """The first ``count`` requests of the offline workload: prompts of :func:`offline_lengths` and their
    sampling parameters (greedy, exactly the output length: end-of-sequence ignored)."""
    lengths = offline_lengths(count)
    ps = [prompts(1, n, loaded.config.vocab_size, seed=i)[0] for i, (n, _) in enumerate(lengths)]
    return ps, [SamplingParams(max_tokens=m, ignore_eos=True) for _, m in lengths]


def offline_llm(
    loaded: LoadedModel,
    continuous: bool,
    max_batch: int,
    step_graphs: bool | None = None,
    overlap: bool | None = None,
) -> LLM:
    """The engine the offline workload runs on: continuous or static batching, everything else as by default."""
    flags = EngineFlags() if continuous else EngineFlags().without("continuous_batching")
    return LLM(loaded, flags=flags, device="cuda", max_model_len=2100, max_batch_size=max_batch,
               max_num_batched_tokens=8192, step_graphs=step_graphs, overlap=overlap)  # fmt: skip


OFFLINE_RUNS = 2  # timed passes per schedule after the warm-up pass; the best is reported, every one recorded


def offline(
    loaded: LoadedModel,
    continuous: bool,
    max_batch: int,
    count: int,
    step_graphs: bool | None = None,
    overlap: bool | None = None,
) -> dict[str, Any]:
    ps, params = offline_requests(loaded, count)
    llm = offline_llm(loaded, continuous, max_batch, step_graphs=step_graphs, overlap=overlap)
    # Warm-up: the whole workload once, so that every kernel shape, autotuning choice and step graph it needs
    # exists before the clock starts (a fresh machine compiles them during the first pass).
    llm.generate(ps, params)
    runs = [timed(lambda: llm.generate(ps, params)) for _ in range(OFFLINE_RUNS)]
    seconds = min(runs)
    tokens = sum(p.max_tokens for p in params)
    return {"output_tokens": tokens, "seconds": seconds, "seconds_runs": runs, "admission_batch": llm.admission_batch,
            "output_tokens_per_s": tokens / seconds}  # fmt: skip


def offline_section(loaded: LoadedModel, count: int, bandwidth: float) -> dict[str, Any]:
    """Continuous against static batching at a maximum batch of 64, and continuous with eager prompt steps and
    without host overlap; beside them, :func:`offline_floor` with steps at the memory roofline (``bandwidth``:
    bytes per second)."""

    def roofline_step(contexts: list[int]) -> float:
        return step_bytes(loaded, len(contexts), sum(contexts) / len(contexts)) / bandwidth

    section: dict[str, Any] = {
        "floor": offline_floor(roofline_step, offline_lengths(count), 64),
        "continuous": offline(loaded, True, 64, count),
        "static": offline(loaded, False, 64, count),
        "continuous_eager_prompt_steps": offline(loaded, True, 64, count, step_graphs=False),
        "continuous_no_overlap": offline(loaded, True, 64, count, overlap=False),
    }
    static = section["static"]["output_tokens_per_s"]
    section["ratio"] = section["continuous"]["output_tokens_per_s"] / static
    section["ratio_no_overlap"] = section["continuous_no_overlap"]["output_tokens_per_s"] / static
    return section


def triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache (one folder each): the difference over a phase counts its compilations."""
    import os

    folder = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0


def percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {}
    return {f"p{p}": values[min(len(values) - 1, int(p / 100 * len(values)))] * 1e3 for p in (50, 90, 99)}


def online(loaded: LoadedModel, rate: float, count: int, max_batch: int) -> dict[str, Any]:
    """The Poisson stream twice on one engine: ``cold`` right after a short warm-up (what a fresh server's first
    users see: kernels compiled on first use of a shape), then ``warm`` (the same stream again)."""
    from llamatelemetry_batch import SamplingParams as BatchParams

    llm = LLM(loaded, device="cuda", max_model_len=1100, max_batch_size=max_batch, max_num_batched_tokens=4096)
    llm.generate(prompts(4, 100, loaded.config.vocab_size), SamplingParams(max_tokens=8))  # warm-up
    engine = llm.continuous_server().engine
    result: dict[str, Any] = {"rate_per_s": rate, "requests": count, "overlap": engine.overlap}
    # Each model step's wall time and the Triton kernels compiled meanwhile: what a long time to first token
    # was spent on.
    step_seconds: list[float] = []
    model_step = engine.model.step

    def timed_step(batch: Any) -> Any:
        start = time.perf_counter()
        out = model_step(batch)
        step_seconds.append(time.perf_counter() - start)
        return out

    engine.model.step = timed_step  # type: ignore[method-assign]
    for name in ("cold", "warm"):
        rng = random.Random(0)
        handles = []
        step_seconds.clear()
        compiled = triton_cache_entries()
        engine.start()
        try:
            for i in range(count):
                time.sleep(rng.expovariate(rate))
                p = prompts(1, rng.randint(100, 512), loaded.config.vocab_size, seed=1000 + i)[0]
                handles.append(engine.submit(p, BatchParams(max_new_tokens=rng.randint(50, 256), ignore_eos=True)))
            outputs = [h.result() for h in handles]
        finally:
            engine.stop()
        ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs if o.metrics.first_token_time]
        itl = [b - a for o in outputs for a, b in zip(o.metrics.token_times, o.metrics.token_times[1:], strict=False)]
        slow = sorted(step_seconds, reverse=True)
        result[name] = {
            "ttft_ms": percentiles(ttft),
            "itl_ms": percentiles(itl),
            "steps": len(step_seconds),
            "steps_over_50ms": sum(1 for t in slow if t > 0.05),
            "slowest_steps_ms": [round(t * 1e3, 1) for t in slow[:5]],
            "triton_kernels_compiled": triton_cache_entries() - compiled,
        }
        print(f"online {name}: {result[name]}", flush=True)
    # The headline figures are the warm ones; the cold ones say what a fresh server pays on first use.
    result["ttft_ms"], result["itl_ms"] = result["warm"]["ttft_ms"], result["warm"]["itl_ms"]
    return result


def summary(results: dict[str, Any]) -> str:
    gpu = results["environment"]["gpu"]
    lines = [f"# Engine on {gpu}", "", "## Decode (Llama-3.2-1B shape, fp16, prompt 128)", ""]
    lines.append("| batch | engine decode tok/s | roofline tok/s | of roofline | target | engine e2e tok/s | "
                 "HF dynamic tok/s | HF static+compile tok/s | engine / HF best |")  # fmt: skip
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for row in results["decode"]:
        best = max(v for v in (row["hf_dynamic"], row["hf_static_compile"]) if v)
        lines.append(
            f"| {row['batch']} | {row['decode_tokens_per_s']:,.0f} | {row['roofline_tokens_per_s']:,.0f} | "
            f"{row['roofline_fraction']:.0%} | {row['target']:.0%} | {row['end_to_end_tokens_per_s']:,.0f} | "
            f"{row['hf_dynamic']:,.0f} | {row['hf_static_compile']:,.0f} | "
            f"{row['end_to_end_tokens_per_s'] / best:.2f}x |"
        )
    off = results["offline"]
    cont, stat = off["continuous"]["output_tokens_per_s"], off["static"]["output_tokens_per_s"]
    lines += ["", "## Offline (256 requests, lengths uniform 100..1024)", ""]
    lines.append(
        f"continuous {cont:,.0f} tok/s, static {stat:,.0f} tok/s: {off['ratio']:.2f}x (target {CONTINUOUS_TARGET}x)"
    )
    if "floor" in off:
        floor = off["floor"]
        lines.append(
            f"at the memory roofline (decode steps only) the schedules' ratio is {floor['ratio']:.2f}x against these "
            f"static batches and {floor['ratio_padded']:.2f}x against padded ones (finished members kept in the step)"
        )
    if "continuous_no_overlap" in off:
        plain = off["continuous_no_overlap"]["output_tokens_per_s"]
        lines.append(f"continuous without host overlap (LLM(overlap=False)) {plain:,.0f} tok/s: {plain / stat:.2f}x")
    if "continuous_eager_prompt_steps" in off:
        eager = off["continuous_eager_prompt_steps"]["output_tokens_per_s"]
        lines.append(f"continuous without step graphs (LLM(step_graphs=False)) {eager:,.0f} tok/s: {eager / stat:.2f}x")
    on = results["online"]
    lines += ["", f"## Online (Poisson, {on['rate_per_s']} requests/s, the stream run twice on one engine)", ""]
    for name in ("cold", "warm"):
        if name in on:
            ttft, itl = on[name]["ttft_ms"], on[name]["itl_ms"]
            lines.append(f"{name}: TTFT ms " + ", ".join(f"{k} {v:.1f}" for k, v in ttft.items())
                         + "; ITL ms " + ", ".join(f"{k} {v:.2f}" for k, v in itl.items()))  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default results/<gpu-slug>/engine)")
    parser.add_argument("--quick", action="store_true", help="fewer requests and tokens (a smoke run)")
    parser.add_argument(
        "--engine-only", action="store_true", help="decode throughput of the engine alone (no baselines, no serving)"
    )
    parser.add_argument(
        "--decode-only", action="store_true", help="the decode section with transformers beside it (decode_only.json)"
    )
    parser.add_argument("--online-only", action="store_true", help="the online section alone (its own JSON file)")
    parser.add_argument("--offline-only", action="store_true", help="the offline section alone (its own JSON file)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_engine: needs a CUDA GPU", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    out_dir = args.out or Path(__file__).resolve().parents[1] / "results" / device_slug() / "engine"
    loaded = random_weights(PRESETS["llama-3.2-1b"], seed=0, dtype=torch.float16)
    bandwidth = copy_bandwidth()
    new_tokens = 32 if args.quick else 128
    results: dict[str, Any] = {
        "environment": {
            "gpu": gpu,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "copy_bandwidth_gb_s": bandwidth / 1e9,
        },
        "decode": [],
    }

    def save(name: str = "results.json") -> None:
        # After every section, so that a run stopped part-way keeps what it measured.
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text(json.dumps(results, indent=2), encoding="utf-8")

    if args.online_only:
        results["online"] = online(loaded, rate=8.0, count=32 if args.quick else 128, max_batch=64)
        save("online_only.json")
        return 0
    if args.offline_only:
        results["offline"] = offline_section(loaded, 64 if args.quick else 256, bandwidth)
        save("offline_only.json")
        off = results["offline"]
        print(f"offline: continuous {off['continuous']['output_tokens_per_s']:,.0f} tok/s, static "
              f"{off['static']['output_tokens_per_s']:,.0f} tok/s: {off['ratio']:.2f}x; continuous with eager prompt "
              f"steps {off['continuous_eager_prompt_steps']['output_tokens_per_s']:,.0f} tok/s; at the memory "
              f"roofline {off['floor']['ratio']:.2f}x (padded static batches "
              f"{off['floor']['ratio_padded']:.2f}x)")  # fmt: skip
        print(f"  continuous without host overlap (LLM(overlap=False): each step's tokens read back before the next "
              f"is planned, as static batching does) {off['continuous_no_overlap']['output_tokens_per_s']:,.0f} "
              f"tok/s: {off['ratio_no_overlap']:.2f}x static")  # fmt: skip
        for name in ("continuous", "static", "continuous_eager_prompt_steps", "continuous_no_overlap"):
            print(f"  {name}: timed runs {', '.join(f'{t:.2f}' for t in off[name]['seconds_runs'])} s; "
                  f"{off['floor']['steps'].get(name, '-')} decode steps in the schedule")  # fmt: skip
        return 0
    for batch in (1, 64):
        llm = LLM(loaded, device="cuda", max_model_len=512, max_batch_size=64)
        row: dict[str, Any] = {"batch": batch, **engine_decode(llm, batch, 128, new_tokens)}
        row["implementations"] = {k: s.implementation for k, s in llm.flags.states.items() if s.active}
        del llm
        free_memory()
        roof = bandwidth / step_bytes(loaded, batch, 128 + new_tokens / 2) * batch
        row.update(roofline_tokens_per_s=roof, roofline_fraction=row["decode_tokens_per_s"] / roof,
                   target=ROOFLINE_TARGETS[batch])  # fmt: skip
        print(f"engine decode batch {batch}: {row}", flush=True)
        if args.engine_only:
            row["hf_dynamic"] = row["hf_static_compile"] = 0.0
            results["decode"].append(row)
            continue
        row["hf_dynamic"] = transformers_decode(loaded, batch, 128, new_tokens, static=False)
        try:
            row["hf_static_compile"] = transformers_decode(loaded, batch, 128, new_tokens, static=True)
        except Exception as exc:  # reported, not hidden: transformers' compiled path is not ours to fix
            row["hf_static_compile"], row["hf_static_compile_error"] = 0.0, repr(exc)
        results["decode"].append(row)
        save()
        print(f"decode batch {batch}: {row}", flush=True)
    if args.engine_only or args.decode_only:
        save("engine_only.json" if args.engine_only else "decode_only.json")
        return 0
    results["offline"] = offline_section(loaded, 64 if args.quick else 256, bandwidth)
    save()
    results["online"] = online(loaded, rate=8.0, count=32 if args.quick else 128, max_batch=64)
    save()
    text = summary(results)
    (out_dir / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
