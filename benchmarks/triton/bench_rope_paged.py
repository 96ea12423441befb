"""RoPE and the paged KV write in one launch against the two launches it replaces, at decode shapes.

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/triton/bench_rope_paged.py

A decode step of a Llama-3 shape attention layer: 32 query and 8 KV heads of 128, fp16, a paged store of page
16, one new token per sequence at positions up to 4096, batch 1, 8 and 64. Per batch, 16 layers (the depth of
Llama-3.2-1B), each with its own q/k/v and store, are captured back to back in one CUDA graph and its replay is
timed (``do_bench_ms``, L2 flushed before each replay), so launch gaps count as in an engine's replayed step:

* baseline: ``triton_rope`` (q and k in place) then ``paged_write`` (kvcache's Triton write) per layer;
* fused: ``triton_rope_paged_write`` per layer;
* each of the two baseline launches alone, for where the time goes.

Before timing, the fused call's q, k and store are checked equal, bit for bit, to the two calls'. Each row is
microseconds per step (16 layers) with the baseline of the same run and the ratio; the note gives the bytes
moved per step as GB/s beside the device-to-device copy bandwidth measured in this run (at these sizes the
launches are latency-bound, far from it). Target: the fused step is faster than the two calls at every batch.
Results under ``benchmarks/results/<gpu-slug>/triton-rope-paged/``; the table is printed last.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llamatelemetry_core.kv_layout import PagedKV
from llamatelemetry_core.testing.bench import Report, Row, capture_for_timing, copy_gbps, do_bench_ms, warm_gpu
from llamatelemetry_kvcache.paged_write import paged_write
from llamatelemetry_triton import rope_cos_sin, triton_rope, triton_rope_paged_write

HEADS, KV_HEADS, HEAD_DIM, PAGE, LAYERS, MAX_POSITIONS = 32, 8, 128, 16, 16, 4096
DTYPE = torch.float16


@dataclass
class Layer:
    """One layer's step inputs: q/k/v slices of a fused projection, positions, its store and slots."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    store: PagedKV
    slots: torch.Tensor


def _layers(batch: int, gen: torch.Generator, device: str = "cuda") -> list[Layer]:
    out = []
    blocks = batch * (MAX_POSITIONS // PAGE)
    for _ in range(LAYERS):
        qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen).to(device, DTYPE)
        hq, hk = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        q, k, v = (qkv[:, a:b].view(batch, -1, HEAD_DIM) for a, b in ((0, hq), (hq, hq + hk), (hq + hk, None)))
        shape = (blocks, PAGE, KV_HEADS, HEAD_DIM)
        store = PagedKV(torch.zeros(shape, dtype=DTYPE, device=device), torch.zeros(shape, dtype=DTYPE, device=device))
        positions = torch.randint(0, MAX_POSITIONS, (batch,), generator=gen).to(device)
        slots = torch.randperm(blocks * PAGE, generator=gen)[:batch].to(device)
        out.append(Layer(q, k, v, positions, store, slots))
    return out


def _check_equal(batch: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """The fused call's q, k and store equal the two calls' to the bit (else timing it would mean nothing)."""
    device = str(cos.device)
    two, one = (_layers(batch, torch.Generator().manual_seed(batch), device)[0] for _ in range(2))
    triton_rope(two.q, two.k, cos, sin, two.positions)
    paged_write(two.k, two.v, two.store, two.slots, backend="triton")
    triton_rope_paged_write(one.q, one.k, one.v, cos, sin, one.positions, one.store, one.slots, backend="triton")
    pairs = ((one.q, two.q), (one.k, two.k), (one.store.key_cache, two.store.key_cache))
    if not all(torch.equal(a, b) for a, b in (*pairs, (one.store.value_cache, two.store.value_cache))):
        raise AssertionError(f"batch {batch}: the fused call differs from triton_rope + paged_write")


def _step_us(layers: list[Layer], call: Callable[[Layer], object]) -> float:
    """Microseconds of one replay of the 16 layers' calls captured back to back."""
    index = iter(range(1 << 30))

    def one() -> None:
        call(layers[next(index) % LAYERS])

    graph = capture_for_timing(one, LAYERS, warmup=LAYERS)
    return do_bench_ms(graph.replay) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: the results tree)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    args = parser.parse_args(argv)
    report = Report("triton-rope-paged")
    warm_gpu()
    cos, sin = rope_cos_sin(MAX_POSITIONS, HEAD_DIM, device="cuda")
    ceiling = copy_gbps(buffer_bytes=64 << 20, time_ms=functools.partial(do_bench_ms, graph=True))
    report.extra.update(copy_gbps=ceiling, layers=LAYERS, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    for batch in args.batches:
        _check_equal(batch, cos, sin)
        layers = _layers(batch, torch.Generator().manual_seed(batch))
        rope_us = _step_us(layers, lambda x: triton_rope(x.q, x.k, cos, sin, x.positions))
        write_us = _step_us(layers, lambda x: paged_write(x.k, x.v, x.store, x.slots, backend="triton"))

        def two_calls(x: Layer) -> None:
            triton_rope(x.q, x.k, cos, sin, x.positions)
            paged_write(x.k, x.v, x.store, x.slots, backend="triton")

        both_us = _step_us(layers, two_calls)
        fused_us = _step_us(
            layers,
            lambda x: triton_rope_paged_write(x.q, x.k, x.v, cos, sin, x.positions, x.store, x.slots),
        )
        # Bytes per layer: q, k, v read; q, k written back; k, v stored; positions, slots and two table rows.
        elements = batch * HEAD_DIM * ((HEADS + 2 * KV_HEADS) + (HEADS + KV_HEADS) + 2 * KV_HEADS)
        moved = LAYERS * (elements * DTYPE.itemsize + batch * (16 + 4 * HEAD_DIM))
        note = f"{moved / (fused_us * 1e-6) / 1e9:.0f} GB/s of {ceiling:.0f} GB/s copy"
        group = f"batch {batch}, {LAYERS} layers"
        report.add(Row(group, "triton_rope alone", rope_us, "us"))
        report.add(Row(group, "paged_write alone", write_us, "us"))
        report.add(Row(group, "fused rope + store", fused_us, "us", both_us, "triton_rope + paged_write", note))
        report.check(f"fused faster than the two calls, batch {batch} (x)", both_us / fused_us, 1.0)
    return report.finish(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
