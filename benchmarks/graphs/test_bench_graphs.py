"""pytest-benchmark timings of the decoder step: eager, our graph replay, and a raw torch.cuda.CUDAGraph replay.

Run on a GPU machine: ``pytest benchmarks --benchmark-only`` (skipped without CUDA by the ``gpu`` marker). Each
timed call ends with ``torch.cuda.synchronize()`` so the figure is the latency of one step. The workload is the
one of ``bench_graphs.py`` (loaded from this directory), which also writes per-device results.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from llamatelemetry_graphs import CUDAGraph, GraphCaptureConfig

pytestmark = pytest.mark.gpu


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_graphs", Path(__file__).with_name("bench_graphs.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def decoder_step() -> dict[str, Any]:
    bench = _load_bench()
    device = torch.device("cuda")
    model = bench.build_decoder(device)
    generator = torch.Generator().manual_seed(0)
    new_x = torch.randn(1, bench.WIDTH, generator=generator).to(device, torch.float16)
    with torch.inference_mode():
        graph = CUDAGraph(GraphCaptureConfig(warmup_iters=3))
        graph.capture(model, inputs=(new_x.clone(),))
        raw_input = new_x.clone()
        raw, _ = bench.raw_torch_graph(model, raw_input)
    return {"model": model, "x": new_x, "graph": graph, "raw": raw, "raw_input": raw_input}


def _synchronized(fn: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        with torch.inference_mode():
            fn()
        torch.cuda.synchronize()

    return call


def test_decoder_step_eager(benchmark: Any, decoder_step: dict[str, Any]) -> None:
    model, x = decoder_step["model"], decoder_step["x"]
    benchmark(_synchronized(lambda: model(x)))


def test_decoder_step_graph_replay(benchmark: Any, decoder_step: dict[str, Any]) -> None:
    graph, x = decoder_step["graph"], decoder_step["x"]
    benchmark(_synchronized(lambda: graph.replay(x)))


def test_decoder_step_raw_torch_replay(benchmark: Any, decoder_step: dict[str, Any]) -> None:
    raw, raw_input, x = decoder_step["raw"], decoder_step["raw_input"], decoder_step["x"]

    def step() -> None:
        raw_input.copy_(x)
        raw.replay()

    benchmark(_synchronized(step))
