"""Can the decode step's small projections find their weights in L2? A measurement, before any engine change.

At Llama-3.2-1B's decode shapes (fp16), the engine's four projections per layer (q/k/v, o, gate/up with SwiGLU,
down) run as the engine runs them: 16 layers' distinct weights back to back in one CUDA graph, the median replay
per layer. q/k/v (12.6 MB) and o (8.4 MB) are latency-bound at these sizes (about half the copy bandwidth); the
big MLP projections stream 100 MB per layer at a higher fraction. Variants, at 1 row (few-row kernels) and at
64 rows (small-M kernels):

- ``cold``: every layer its own weights (the engine today);
- ``hot ceiling``: every layer reads layer 0's q/k/v and o weights (then found in L2), the MLP's its own: what a
  perfect prefetch of those two could give at most;
- ``prefetch asm``: a side branch of the graph, forked after layer i's o projection and joined before layer
  i+1's q/k/v, issues ``prefetch.global.L2::evict_last`` for every 128-byte line of layer i+1's q/k/v and o
  weights while the MLP runs;
- ``prefetch load``: the same branch reading those lines with ``evict_last`` loads instead.

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/engine/l2_prefetch.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from llamatelemetry_core.testing.bench import copy_gbps, gpu_ms, markdown_table, progress
from llamatelemetry_triton._compat import tl, triton
from llamatelemetry_triton.ops._linear_kernel import linear_forward

LAYERS = 16
HIDDEN, INTERMEDIATE, QKV = 2048, 8192, 3072
LINE_ELEMENTS = 64  # fp16 elements in a 128-byte line
LINES_PER_PROGRAM = 1024


@triton.jit  # type: ignore[untyped-decorator]
def _prefetch_lines(ptr, sink, n_lines, ASM: tl.constexpr, LINES: tl.constexpr):  # type: ignore[no-untyped-def]
    offs = tl.program_id(0) * LINES + tl.arange(0, LINES)
    mask = offs < n_lines
    p = ptr + tl.where(mask, offs, 0).to(tl.int64) * 64
    if ASM:
        tl.inline_asm_elementwise(
            "prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1
        )
    else:
        v = tl.load(p, mask=mask, other=0.0, eviction_policy="evict_last")
        # a store nobody reads (only of a NaN weight, and there is none), that the compiler cannot prove dead
        tl.store(sink + tl.arange(0, LINES) * 0, v, mask=mask & (v != v))


def prefetch(weight: torch.Tensor, sink: torch.Tensor, asm: bool) -> None:
    lines = weight.numel() // LINE_ELEMENTS
    grid = (triton.cdiv(lines, LINES_PER_PROGRAM),)
    _prefetch_lines[grid](weight, sink, lines, ASM=asm, LINES=LINES_PER_PROGRAM)


def per_layer_us(fn: Callable[[], object]) -> float:
    return gpu_ms(fn, graph=True, reps=30, warmup=3) * 1e3 / LAYERS


def layer_steps(rows: int) -> dict[str, float]:
    dev, dt = "cuda", torch.float16
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev, dtype=dt) * scale

    qkv = [randn(QKV, HIDDEN, scale=HIDDEN**-0.5) for _ in range(LAYERS)]
    o = [randn(HIDDEN, HIDDEN, scale=HIDDEN**-0.5) for _ in range(LAYERS)]
    gate_up = [randn(2 * INTERMEDIATE, HIDDEN, scale=HIDDEN**-0.5) for _ in range(LAYERS)]
    down = [randn(HIDDEN, INTERMEDIATE, scale=INTERMEDIATE**-0.5) for _ in range(LAYERS)]
    x = randn(rows, HIDDEN)
    side = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    sink = torch.zeros(1, device=dev, dtype=dt)

    def step(qkv_w: list[torch.Tensor], o_w: list[torch.Tensor], mode: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            main = torch.cuda.current_stream()
            h = x
            for i in range(LAYERS):
                if i > 0 and mode != "none":
                    main.wait_stream(side)
                a = linear_forward(h, None, None, qkv_w[i], None, 0.0)[0]
                h2 = linear_forward(a[:, :HIDDEN], None, None, o_w[i], None, 0.0)[0]
                if i + 1 < LAYERS and mode != "none":
                    side.wait_stream(main)
                    with torch.cuda.stream(side):
                        prefetch(qkv_w[i + 1], sink, mode == "asm")
                        prefetch(o_w[i + 1], sink, mode == "asm")
                g = linear_forward(h2, None, None, gate_up[i], None, 0.0, swiglu=True)[0]
                h = linear_forward(g, None, None, down[i], None, 0.0)[0]
            if mode != "none":
                main.wait_stream(side)
            return h

        return run

    hot_qkv, hot_o = [qkv[0]] * LAYERS, [o[0]] * LAYERS
    variants = {
        "cold": step(qkv, o, "none"),
        "hot ceiling": step(hot_qkv, hot_o, "none"),
        "prefetch asm": step(qkv, o, "asm"),
        "prefetch load": step(qkv, o, "load"),
    }
    reference = variants["cold"]()
    for name in ("prefetch asm", "prefetch load"):
        assert torch.equal(variants[name](), reference), f"{name} changed the result"
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(3):  # interleaved rounds
        for name, fn in variants.items():
            times[name].append(per_layer_us(fn))
            progress(f"rows {rows} {name}: {times[name][-1]:.2f} us per layer")
    return {name: sorted(t)[1] for name, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("l2_prefetch: needs a CUDA GPU", file=sys.stderr)
        return 2
    copy = copy_gbps()
    layer_bytes = 2 * (QKV * HIDDEN + HIDDEN * HIDDEN + 2 * INTERMEDIATE * HIDDEN + HIDDEN * INTERMEDIATE)
    floor_us = layer_bytes / (copy * 1e3)
    results = {rows: layer_steps(rows) for rows in (1, 64)}
    lines = [
        f"# L2 prefetch of the next layer's q/k/v and o weights ({torch.cuda.get_device_name()}, torch "
        f"{torch.__version__}, triton {triton.__version__})",
        "",
        f"Per layer, median of three interleaved rounds of 16-layer graph replays; copy {copy:.0f} GB/s; the "
        f"layer's weight bytes at that bandwidth: {floor_us:.2f} us.",
        "",
    ]
    header = ["rows", "variant", "us per layer", "vs cold", "weight bytes at copy bandwidth"]
    cells = [
        [str(rows), name, f"{us:.2f}", f"{t['cold'] / us:.3f}x", f"{floor_us / us:.1%}"]
        for rows, t in results.items()
        for name, us in t.items()
    ]
    table = "\n".join([*lines, markdown_table(header, cells)])
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "l2-prefetch.md").write_text(table + "\n", encoding="utf-8")
        (args.out / "l2-prefetch.json").write_text(
            json.dumps({"copy_gb_s": copy, "per_layer_us": results}, indent=2) + "\n", encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
