"""Real CUDA graphs: replay equals eager, copy-in, shared pools, buckets, capture errors that leave CUDA usable.

Skipped without a CUDA device (``gpu`` marker). Inputs are fresh random tensors; graphs and eager calls use the
same shapes, so they run the same kernels and must agree to the shared tolerances.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from llamatelemetry_core.testing import assert_close
from llamatelemetry_graphs import (
    BatchBucketedGraphs,
    CUDAGraph,
    GraphCaptureConfig,
    GraphCaptureError,
    GraphInputError,
    GraphPool,
    capture_graph,
    enable_cuda_graphs,
)

pytestmark = pytest.mark.gpu

MIB = 1024**2


def _mlp(width: int, dtype: torch.dtype) -> torch.nn.Module:
    model = torch.nn.Sequential(
        torch.nn.LayerNorm(width),
        torch.nn.Linear(width, 3 * width),
        torch.nn.GELU(),
        torch.nn.Linear(3 * width, width),
    )
    return model.to("cuda", dtype).eval()


def _randn(rng: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=rng).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_replay_equals_eager_on_fresh_inputs(dtype: torch.dtype, rng: torch.Generator) -> None:
    model = _mlp(96, dtype)
    x = _randn(rng, 5, 96, dtype=dtype)
    graph = CUDAGraph()
    with torch.inference_mode():
        output = graph.capture(model, inputs=(x,))
        assert graph.is_cuda_graph and graph.device == x.device and graph.pool_handle is not None
        assert_close(output, model(x), name="output after capture")
        for step in range(5):
            new = _randn(rng, 5, 96, dtype=dtype)
            got = graph.replay(new)
            assert got is output
            assert_close(got, model(new), name=f"replay {step}")


def test_guide_block_form_replays_the_static_input(rng: torch.Generator) -> None:
    model = _mlp(64, torch.float32)
    input_tensor = _randn(rng, 3, 64)
    with torch.inference_mode():
        model(input_tensor)  # warm-up is the caller's choice in the block form
        graph = CUDAGraph()
        with graph.capture() as scope:
            output = scope.set_output(model(input_tensor))
        assert graph.is_cuda_graph
        assert_close(output, model(input_tensor), name="output after the block")
        for _ in range(3):
            input_tensor.copy_(_randn(rng, 3, 64))
            assert graph.replay() is output
            assert_close(output, model(input_tensor))


def test_guide_block_form_as_written_returns_the_bound_output(rng: torch.Generator) -> None:
    model = _mlp(64, torch.float16)
    input_tensor = _randn(rng, 4, 64, dtype=torch.float16)
    with torch.inference_mode():
        model(input_tensor)
        graph = CUDAGraph()
        with graph.capture():
            output = model(input_tensor)
        for _ in range(3):
            input_tensor.copy_(_randn(rng, 4, 64, dtype=torch.float16))
            result = graph.replay()
            assert result is output
            assert_close(result, model(input_tensor))


def test_guide_function_form_and_capture_graph(rng: torch.Generator) -> None:
    model = _mlp(64, torch.float16)
    static_input = _randn(rng, 2, 64, dtype=torch.float16)
    with torch.inference_mode():
        graph = CUDAGraph(GraphCaptureConfig(warmup_iters=5))
        graph.capture(lambda: model(static_input), warmup=True)
        helper = capture_graph(lambda: model(static_input) * 2, warmup_iters=3)
        static_input.copy_(_randn(rng, 2, 64, dtype=torch.float16))
        assert_close(graph.replay(), model(static_input))
        assert_close(helper.replay(), model(static_input) * 2)


def test_copy_in_replay_checks_and_nested_outputs(rng: torch.Generator) -> None:
    a, b = _randn(rng, 7, 33), _randn(rng, 33)

    def step(p: torch.Tensor, q: torch.Tensor) -> dict[str, Any]:
        return {"prod": p * q, "parts": (p.sum(0), [q.exp()]), "tag": "decode"}

    graph = CUDAGraph()
    output = graph.capture(step, inputs=(a, b))
    new_a, new_b = _randn(rng, 7, 33), _randn(rng, 33)
    got = graph.replay(new_a, new_b)
    assert got is output and got["tag"] == "decode"
    assert_close(got["prod"], new_a * new_b)
    assert_close(got["parts"][0], new_a.sum(0))
    assert_close(got["parts"][1][0], new_b.exp())
    kept = graph.replay(new_a, None, copy=True)
    assert kept["prod"].data_ptr() != got["prod"].data_ptr()
    with pytest.raises(GraphInputError, match=r"expected replay input 0 .*\[7, 33\] float32 on cuda.*got \[7, 32\]"):
        graph.replay(_randn(rng, 7, 32), None)
    with pytest.raises(GraphInputError, match=r"got \[7, 33\] float32 on cpu"):
        graph.replay(new_a.cpu(), None)
    with pytest.raises(GraphInputError, match=r"got \[7, 33\] float16 on cuda"):
        graph.replay(new_a.half(), None)


def test_pool_graphs_share_one_pool_and_bounded_memory(rng: torch.Generator) -> None:
    model = _mlp(1024, torch.float16)
    sizes = [64, 32, 16, 8, 4, 2, 1]
    with torch.inference_mode():
        alone = GraphPool(GraphCaptureConfig(warmup_iters=2))
        alone.capture("batch_64", model, inputs=(_randn(rng, 64, 1024, dtype=torch.float16),))
        alone_bytes = alone.memory_usage().reserved_bytes
        pool = GraphPool(GraphCaptureConfig(warmup_iters=2))
        inputs = {}
        for size in sizes:  # largest first: the smaller graphs reuse its memory
            inputs[size] = _randn(rng, size, 1024, dtype=torch.float16)
            pool.capture(f"batch_{size}", model, inputs=(inputs[size],))
        handles = {pool.get(name).pool_handle for name in pool.list_graphs()}
        assert handles == {pool.pool_handle}
        together = pool.memory_usage()
        assert alone_bytes > 0
        # Allocator segments are 2 MiB for small blocks: allow one segment of slack over 1.2x.
        assert together.reserved_bytes <= max(1.2 * alone_bytes, alone_bytes + 2 * MIB), (together, alone_bytes)
        for size in sizes:  # replay each and read it at once: a shared pool may reuse other graphs' outputs
            new = _randn(rng, size, 1024, dtype=torch.float16)
            assert_close(pool.replay(f"batch_{size}", new), model(new), name=f"batch {size}")


def test_buckets_pad_and_slice_every_batch_size(rng: torch.Generator) -> None:
    width, vocab, max_batch = 48, 101, 24
    embed = torch.nn.Embedding(vocab, width).to("cuda").eval()
    head = _mlp(width, torch.float32)
    table = _randn(rng, width)

    def decode(tokens: torch.Tensor, hidden: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = head(embed(tokens) * scale + hidden)
        return out

    tokens = torch.randint(0, vocab, (2,), generator=rng).cuda()
    buckets = BatchBucketedGraphs(
        decode, (tokens, _randn(rng, 2, width), table), batch_dims=(0, 0, None), max_batch_size=max_batch
    )
    with torch.inference_mode():
        buckets.capture()
        assert buckets.is_cuda_graph
        assert buckets.pool.list_graphs() == [f"batch_{s}" for s in reversed(buckets.batch_sizes)]
        for batch in range(1, max_batch + 3):
            t = torch.randint(0, vocab, (batch,), generator=rng).cuda()
            h = _randn(rng, batch, width)
            got = buckets(t, h, table)
            assert got.shape == (batch, width)
            # Padded batches run other GEMM shapes than eager: fp32 rounding may differ in the last bits.
            assert_close(got, decode(t, h, table), atol=1e-4, rtol=1e-4, name=f"batch {batch}")
    assert buckets.eager_calls == 2 and buckets.replays == max_batch


def test_item_inside_a_capture_is_explained_and_cuda_stays_usable(rng: torch.Generator) -> None:
    x = _randn(rng, 16)

    def syncs(t: torch.Tensor) -> torch.Tensor:
        return t * 2 if t.sum().item() > 0 else t * 3

    graph = CUDAGraph(GraphCaptureConfig(warmup_iters=1))
    with pytest.raises(GraphCaptureError, match=r"\[host-sync\].*\.item\(\).*What to do") as info:
        graph.capture(syncs, inputs=(x,))
    assert info.value.rule == "host-sync"
    assert not graph.is_captured
    assert not torch.cuda.is_current_stream_capturing()
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # asserts inside PyTorch if the allocator still believed a capture was underway
    good = CUDAGraph()
    good.capture(lambda t: t * 2 + 1, inputs=(x,))
    new = _randn(rng, 16)
    assert_close(good.replay(new), new * 2 + 1)
    raw = torch.cuda.CUDAGraph()  # and PyTorch's own capture still works
    with torch.cuda.graph(raw):
        y = x * 3
    raw.replay()
    torch.cuda.synchronize()
    assert_close(y, x * 3)


def test_a_failed_first_capture_in_a_pool_does_not_poison_it(rng: torch.Generator) -> None:
    x = _randn(rng, 8)
    pool = GraphPool(GraphCaptureConfig(warmup_iters=0))
    with pytest.raises(GraphCaptureError, match="host-sync"):
        pool.capture("bad", lambda: x * float(x.sum().item()))
    assert len(pool) == 0
    pool.capture("good", lambda t: t.exp(), inputs=(x,))
    assert_close(pool.replay("good", x), x.exp())


@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")
def test_cpu_work_inside_a_capture_is_refused(rng: torch.Generator) -> None:
    cpu = torch.randn(4, generator=rng)
    with pytest.raises(GraphCaptureError, match=r"\[cpu-tensor\].*output tensor 0 is on cpu"):
        CUDAGraph().capture(lambda: cpu * 2)
    with pytest.raises(GraphCaptureError, match=r"\[cpu-tensor\].*inputs\[0\] is on cpu"):
        CUDAGraph().capture(torch.neg, inputs=(cpu,))
    assert not torch.cuda.is_current_stream_capturing()


@pytest.mark.filterwarnings("ignore:The CUDA Graph is empty")
def test_nested_capture_is_refused(rng: torch.Generator) -> None:
    x = _randn(rng, 4)
    outer = CUDAGraph()
    with pytest.raises(GraphCaptureError, match="nested-capture"), outer.capture():
        CUDAGraph().capture(torch.neg, inputs=(x,))
    assert not outer.is_captured and not torch.cuda.is_current_stream_capturing()
    torch.cuda.empty_cache()


def test_enable_cuda_graphs_replays_per_signature(rng: torch.Generator) -> None:
    model = _mlp(128, torch.float16)
    graphed = enable_cuda_graphs(model, max_graphs=2)
    with torch.inference_mode():
        for rows in (1, 4, 1, 4, 9, 1):
            x = _randn(rng, rows, 128, dtype=torch.float16)
            assert_close(graphed(x), model(x), name=f"rows {rows}")
        cpu = torch.randn(2, 128, generator=rng).half()
        graphed(cpu.cuda())
    assert graphed.stats.captures == 2 and graphed.stats.replays == 3
    assert graphed.stats.eager_calls == {"graph limit reached": 2}
    assert graphed.memory_usage().reserved_bytes > 0


def test_cpu_tensors_and_grad_run_eagerly_on_a_gpu_machine(rng: torch.Generator) -> None:
    model = torch.nn.Linear(8, 8)
    graphed = enable_cuda_graphs(model)
    x = torch.randn(2, 8, generator=rng)
    with torch.no_grad():
        assert_close(graphed(x), model(x))
    graphed.cuda()
    graphed(x.cuda())  # grad mode on and parameters require grad
    assert graphed.stats.eager_calls == {"cpu tensor": 1, "requires grad": 1}
    assert graphed.num_graphs == 0


def test_a_capture_declares_its_graph_to_core_while_it_records() -> None:
    # Kernels that keep per-graph state (the split-K counts of llamatelemetry-triton) ask core which graph a
    # launch is recorded into; a capture of this package answers for every torch release.
    from llamatelemetry_core.capture import capturing_graph

    seen: list[object | None] = []
    x = torch.ones(4, device="cuda")

    def step() -> torch.Tensor:
        seen.append(capturing_graph())
        return x * 2

    graph = CUDAGraph()
    graph.capture(step)  # warm-up calls first (not capturing: None), then the recorded one
    assert capturing_graph() is None  # not capturing any more
    pool = GraphPool()
    pool.capture("a", step)
    pool.capture("b", step)
    recorded = [s for s in seen if s is not None]
    assert len(recorded) == 3 and all(isinstance(s, torch.cuda.CUDAGraph) for s in recorded)
    assert recorded[1] is not recorded[2]  # a graph each, in one pool
