"""``llamatelemetry bench``: what each optimization buys on this machine, each against its own baseline.

One row per optimization of the guide's table (CUDA graphs, Tensor Cores fp16, FlashAttention, Triton fused
kernels, paged KV cache, continuous batching): the engine with every optimization on, against the same engine
with only that one off, on the same weights in the same run; then the whole engine, all on against all off.
Each row gives the metric, both figures, the gain, the implementation that actually ran, and the range the
guide claims. A row that cannot run here (a CPU has no CUDA graphs or Tensor Cores, and Triton compiles for
GPUs only) says what it needs instead of failing.
"""

from __future__ import annotations

import gc
import importlib
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llamatelemetry_core.selection import last_selection
from llamatelemetry_engine.engine import LLM
from llamatelemetry_engine.errors import ModelLoadError
from llamatelemetry_engine.flags import EngineFlags, resolve_flags
from llamatelemetry_engine.loader import LoadedModel, load_model
from llamatelemetry_engine.sampling import SamplingParams

__all__ = ["CLAIMS", "GPU_WARMUPS", "Workload", "format_table", "plot_report", "run_bench"]

CLAIMS: dict[str, str] = {
    "cuda_graphs": "20-40% lower latency",
    "tensor_cores": "2-4x throughput, 50% memory",
    "flash_attention": "2-3x for long sequences, 5-10x memory",
    "triton_kernels": "1.5-2x (the norm alone)",
    "paged_kv": "- (not in the guide's table)",
    "continuous_batching": "2-4x throughput",
    "engine": "- (combine optimizations)",
}
"""The guide's claimed gains (Tesla T4, 1B model), shown beside ours."""

TITLES = {
    "cuda_graphs": "CUDA Graphs",
    "tensor_cores": "Tensor Cores (FP16)",
    "flash_attention": "FlashAttention",
    "triton_kernels": "Triton fused kernels",
    "paged_kv": "Paged KV cache",
    "continuous_batching": "Continuous batching",
    "engine": "Whole engine (all on vs all off)",
}
GPU_ONLY = {
    "cuda_graphs": "needs a CUDA GPU (graphs capture GPU work)",
    "tensor_cores": "needs a GPU with Tensor Cores (on a CPU fp16 is no faster)",
    "triton_kernels": "needs a GPU (Triton compiles for GPUs; on a CPU both paths are PyTorch)",
}


@dataclass(frozen=True)
class Workload:
    """Sizes of one bench run."""

    prompt_len: int
    new_tokens: int
    batch: int
    long_prompt: int
    requests: int
    repeats: int = 2

    @classmethod
    def pick(cls, quick: bool, cuda: bool) -> Workload:
        if cuda:
            return cls(128, 32, 16, 2048, 32) if quick else cls(128, 128, 64, 4096, 128)
        return cls(16, 4, 2, 128, 4, repeats=1) if quick else cls(64, 16, 4, 512, 8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


GPU_WARMUPS = 2
"""Untimed calls before a GPU measurement. The first fills the prefix cache; the second finds its prompts there
and takes other launch shapes (a prefill of the uncached tail), whose Triton kernels compile then. With one
warm-up those compilations, a second or more each, fell into the timed calls (an H200 run measured an eager
decode step at 65 ms instead of about 16)."""


def _timed(device: torch.device, fn: Callable[[], Any], repeats: int, *, warmups: int | None = None) -> float:
    """Median wall time of ``repeats`` calls of ``fn``, in seconds, after ``warmups`` untimed calls (default
    :data:`GPU_WARMUPS` on a GPU, where graph capture, Triton compilation and the allocator's first growth happen
    in them; none on a CPU, which has nothing to compile)."""
    for _ in range(warmups if warmups is not None else GPU_WARMUPS if device.type == "cuda" else 0):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 1, (length,), generator=gen).tolist() for _ in range(count)]


class _Bench:
    def __init__(self, loaded: LoadedModel, device: torch.device, work: Workload) -> None:
        self.loaded = loaded
        self.device = device
        self.work = work
        self.vocab = loaded.config.vocab_size
        self.max_len = min(loaded.config.max_position_embeddings, work.long_prompt + work.new_tokens + 16)

    def engine(self, flags: EngineFlags, step_graphs: bool | None = None) -> LLM:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return LLM(self.loaded, flags=flags, device=self.device, max_model_len=self.max_len,
                   max_batch_size=max(self.work.batch, 1), step_graphs=step_graphs)  # fmt: skip

    def decode_step_s(self, llm: LLM, batch: int) -> float:
        """Seconds per decode step at ``batch`` (two generate lengths, the difference is decode only)."""
        prompts = _prompts(batch, self.work.prompt_len, self.vocab)
        n = self.work.new_tokens

        def run(tokens: int) -> Callable[[], Any]:
            return lambda: llm.generate(prompts, SamplingParams(max_tokens=tokens, ignore_eos=True))

        r = self.work.repeats
        return max(_timed(self.device, run(n), r) - _timed(self.device, run(1), r), 1e-9) / (n - 1)

    def prefill(self, llm: LLM) -> tuple[float, int | None]:
        """Seconds and peak bytes of a ``long_prompt``-token prefill."""
        prompt = _prompts(1, self.work.long_prompt, self.vocab, seed=1)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        seconds = _timed(self.device, lambda: llm.generate(prompt, SamplingParams(max_tokens=1)), self.work.repeats)
        peak = torch.cuda.max_memory_allocated(self.device) - base if self.device.type == "cuda" else None
        return seconds, peak

    def offline_tokens_per_s(self, llm: LLM) -> float:
        """Output tokens/s of requests of mixed prompt and output lengths."""
        gen = torch.Generator().manual_seed(2)
        w = self.work
        lengths = torch.randint(w.prompt_len // 4, w.prompt_len + 1, (w.requests,), generator=gen).tolist()
        outputs = torch.randint(2, w.new_tokens * 2 + 1, (w.requests,), generator=gen).tolist()
        prompts = [_prompts(1, n, self.vocab, seed=i)[0] for i, n in enumerate(lengths)]
        total = sum(outputs)
        params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in outputs]
        return float(total / _timed(self.device, lambda: llm.generate(prompts, params), repeats=1))


_OPERATIONS = {
    "triton_kernels": (
        "triton.fused_add_rmsnorm",
        "triton.rope",
        "triton.rope_paged_write",
        "triton.swiglu",
        "triton.rmsnorm_linear",
        "triton.fused_add_rmsnorm_linear",
        "triton.linear",
        "triton.swiglu_linear",
    ),
    "flash_attention": ("flashattn.attention",),
    "paged_kv": ("flashattn.paged_attention",),
}


def _implementation(llm: LLM, name: str) -> str:
    """What ran for ``name``: the last dispatch of its operations (the optimized engine runs last), else the flag's
    resolved implementation."""
    ran = []
    for op in _OPERATIONS.get(name, ()):
        sel = last_selection(op)
        if sel is not None:
            ran.append(f"{op}: {sel.implementation}")
    state = llm.flags.states[name].implementation if name in llm.flags.states else "all on"
    return ", ".join(ran) if ran else state


def _row(name: str, metric: str, base: float | None, opt: float | None, higher_is_better: bool,
         implementation: str, **extra: Any) -> dict[str, Any]:  # fmt: skip
    gain = None
    if base is not None and opt is not None and base > 0 and opt > 0:
        gain = opt / base if higher_is_better else base / opt
    return {
        "name": name, "title": TITLES[name], "status": "measured", "metric": metric, "baseline": base,
        "optimized": opt, "gain": gain, "implementation": implementation, "claimed": CLAIMS[name], **extra,
    }  # fmt: skip


def _skipped(name: str, reason: str) -> dict[str, Any]:
    return {"name": name, "title": TITLES[name], "status": "skipped", "reason": reason, "claimed": CLAIMS[name]}


def _measure(bench: _Bench, name: str) -> dict[str, Any]:
    on = EngineFlags()
    off = on.without(name) if name != "engine" else EngineFlags.all_off()
    resolved = resolve_flags(on, bench.device)
    if name in GPU_ONLY and bench.device.type != "cuda":
        return _skipped(name, GPU_ONLY[name])
    if name != "engine" and not resolved.active(name):
        return _skipped(name, GPU_ONLY.get(name) or resolved.states[name].reason or "not available here")
    w = bench.work
    # Prefills replay step graphs (paged attention) when they fit one, whether FlashAttention is on or not: its
    # row compares eager prefill steps, where FlashAttention runs.
    step_graphs = False if name == "flash_attention" else None
    fast, slow = bench.engine(on, step_graphs), bench.engine(off, step_graphs)
    if name in ("cuda_graphs", "triton_kernels"):
        base, opt = bench.decode_step_s(slow, 1) * 1e3, bench.decode_step_s(fast, 1) * 1e3
        return _row(name, "decode ms/step, batch 1", base, opt, False, _implementation(fast, name))
    if name == "flash_attention":
        (tb, mb), (to, mo) = bench.prefill(slow), bench.prefill(fast)
        return _row(name, f"prefill ms, {w.long_prompt} tokens, eager", tb * 1e3, to * 1e3, False,
                    _implementation(fast, name), memory_baseline=mb, memory_optimized=mo)  # fmt: skip
    if name == "continuous_batching":
        base, opt = bench.offline_tokens_per_s(slow), bench.offline_tokens_per_s(fast)
        return _row(name, f"output tokens/s, {w.requests} mixed requests", base, opt, True,
                    _implementation(fast, name))  # fmt: skip
    batch = w.batch
    base = batch / bench.decode_step_s(slow, batch)
    opt = batch / bench.decode_step_s(fast, batch)
    extra: dict[str, Any] = {}
    if name == "tensor_cores":
        extra = {
            "memory_baseline": sum(p.numel() * p.element_size() for p in slow.model.parameters()),
            "memory_optimized": sum(p.numel() * p.element_size() for p in fast.model.parameters()),
        }
    return _row(name, f"decode tokens/s, batch {batch}", base, opt, True, _implementation(fast, name), **extra)


def _progress(done: int, total: int, label: str) -> None:
    width = 24
    filled = width * done // total
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<40}", end="", file=sys.stderr, flush=True)
    if done == total:
        print(file=sys.stderr)


def run_bench(model: Any = None, *, device: str | torch.device | None = None, quick: bool = False,
              progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run every row; return the report (JSON-friendly).

    ``model`` as for :func:`~llamatelemetry_engine.loader.load_model`; by default the embedded SmolLM2, or on a
    GPU without it the Llama-3.2-1B shape with random weights.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        try:
            loaded = load_model(None)
        except ModelLoadError:
            if dev.type != "cuda":
                raise
            loaded = load_model("random:llama-3.2-1b")
    else:
        loaded = load_model(model)
    work = Workload.pick(quick, dev.type == "cuda")
    bench = _Bench(loaded, dev, work)
    names = [*TITLES]
    rows = []
    for i, name in enumerate(names):
        if progress:
            _progress(i, len(names), TITLES[name])
        rows.append(_measure(bench, name))
    if progress:
        _progress(len(names), len(names), "done")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    c = loaded.config
    return {
        "device": name,
        "model": loaded.source,
        "model_shape": f"{c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads}/{c.num_kv_heads} heads, "
        f"vocab {c.vocab_size}",
        "workload": work.__dict__,
        "torch": torch.__version__,
        "rows": rows,
    }


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as a terminal table."""
    lines = [f"llamatelemetry bench on {report['device']}: {report['model']} ({report['model_shape']})", ""]
    header = (
        f"{'optimization':<34} {'metric':<34} {'baseline':>10} {'optimized':>10} {'gain':>7}  {'guide claims':<38} "
        "implementation"
    )
    lines += [header, "-" * len(header)]
    for r in report["rows"]:
        if r["status"] != "measured":
            lines.append(f"{r['title']:<34} {'skipped: ' + r['reason']}")
            continue
        gain = f"{r['gain']:.2f}x" if r["gain"] is not None else "-"
        lines.append(
            f"{r['title']:<34} {r['metric']:<34} {_fmt(r['baseline']):>10} {_fmt(r['optimized']):>10} {gain:>7}  "
            f"{r['claimed']:<38} {r['implementation']}"
        )
        if r.get("memory_baseline"):
            ratio = r["memory_baseline"] / max(r["memory_optimized"], 1)
            lines.append(f"{'':<34} {'memory MB':<34} {r['memory_baseline'] / 2**20:>10.1f} "
                         f"{r['memory_optimized'] / 2**20:>10.1f} {ratio:>6.2f}x")  # fmt: skip
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str) -> None:
    """A bar chart of the measured gains, written to ``path`` (needs matplotlib)."""
    try:
        matplotlib = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt = importlib.import_module("matplotlib.pyplot")
    except ImportError as exc:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from exc
    rows = [r for r in report["rows"] if r["status"] == "measured" and r["gain"] is not None]
    gains = [r["gain"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    # Gains span 0.5x to 50x: on a log axis a loss points left of 1x and a 1.1x gain stays visible.
    colors = ["#4c72b0" if g >= 1.0 else "#c44e52" for g in gains]
    ax.barh([r["title"] for r in rows], [g - 1.0 for g in gains], left=1.0, color=colors)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, g in enumerate(gains):
        ax.annotate(f"{g:.2f}x", (g, i), xytext=(4 if g >= 1.0 else -4, 0), textcoords="offset points",
                    ha="left" if g >= 1.0 else "right", va="center", fontsize=8)  # fmt: skip
    low, high = min([*gains, 1.0]), max([*gains, 1.0])
    ax.set_xlim(low / 2, high * 2)
    ax.set_xlabel("gain over its own baseline (x, log scale; red: slower)")
    ax.set_title(f"llamatelemetry bench: {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
