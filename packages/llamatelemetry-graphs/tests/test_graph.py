"""CUDAGraph, capture_graph and replay_graph on a machine without CUDA: the eager emulation and its errors.

The same calls run real graphs in test_gpu.py; here every documented call runs, and results are compared with
eager execution on fresh random inputs.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
import torch

from llamatelemetry_core.errors import CapabilityError, ConfigurationError, LlamaTelemetryError
from llamatelemetry_core.testing import assert_close
from llamatelemetry_graphs import (
    CUDAGraph,
    GraphCaptureConfig,
    GraphCaptureError,
    GraphInputError,
    GraphStateError,
    _runtime,
    capture_graph,
    clone_outputs,
    replay_graph,
)

Pair = namedtuple("Pair", ["hidden", "gate"])

# The eager emulation, also on a GPU machine (CPU tensors there would otherwise be refused).
pytestmark = pytest.mark.usefixtures("eager_emulation")


class CountingMLP(torch.nn.Module):
    """A small MLP that counts its calls, with awkward (non power of two) sizes."""

    def __init__(self, width: int = 13, hidden: int = 29) -> None:
        super().__init__()
        self.up = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, width)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        y: torch.Tensor = x + self.down(torch.nn.functional.gelu(self.up(x)))
        return y


@pytest.fixture
def model() -> CountingMLP:
    return CountingMLP().eval()


# --- the guide's two forms --------------------------------------------------------------------------------------


def test_guide_function_form_replays_with_the_static_input(model: CountingMLP, rng: torch.Generator) -> None:
    static_input = torch.randn(3, 13, generator=rng)
    config = GraphCaptureConfig(warmup_iters=5)
    graph = CUDAGraph(config)

    def forward_pass() -> torch.Tensor:
        return model(static_input)  # type: ignore[no-any-return]

    with torch.inference_mode():
        output = graph.capture(forward_pass, warmup=True)
        assert model.calls == 6  # five warm-ups and the recorded call
        assert_close(output, model(static_input))
        for _ in range(3):
            new = torch.randn(3, 13, generator=rng)
            static_input.copy_(new)
            result = graph.replay()
            assert result is output  # the static output, refreshed
            assert_close(result, model(new))
    assert graph.is_captured and not graph.is_cuda_graph


def test_guide_block_form_runs_once_and_cannot_replay_without_cuda(model: CountingMLP, rng: torch.Generator) -> None:
    graph = CUDAGraph()
    input_tensor = torch.randn(2, 13, generator=rng)
    with torch.no_grad(), graph.capture():
        output = model(input_tensor)
    assert model.calls == 1
    assert graph.is_captured and not graph.is_cuda_graph
    with torch.no_grad():
        assert_close(output, model(input_tensor))
    with pytest.raises(CapabilityError, match=r"without CUDA.*graph\.capture\(fn, inputs=\.\.\.\)"):
        graph.replay()


def test_block_form_finds_the_one_variable_the_block_bound(rng: torch.Generator) -> None:
    x = torch.randn(3, 5, generator=rng)
    before = torch.zeros(1)
    graph = CUDAGraph()
    with graph.capture():
        output = x.exp()  # the guide's form: the graph never sees `output`
        note = "not a tensor, so not an output"
    assert graph.output is output and note
    assert before.shape == (1,)

    two = CUDAGraph()
    with two.capture():
        first = x + 1
        second = x - 1
    assert two.output is None, "two candidates: nothing is guessed"
    assert first.shape == second.shape


def test_block_form_records_the_scope_output_and_rejects_warmup(rng: torch.Generator) -> None:
    graph = CUDAGraph()
    x = torch.randn(4, generator=rng)
    with graph.capture() as scope:
        y = scope.set_output(x * 2)
    assert graph.output is y and scope.output is y
    with pytest.raises(ConfigurationError, match=r"expected warmup=None or False .* got True"):
        CUDAGraph().capture(warmup=True)


def test_an_error_inside_the_block_leaves_the_graph_empty() -> None:
    graph = CUDAGraph()
    with pytest.raises(ZeroDivisionError), graph.capture():
        _ = 1 / 0
    assert not graph.is_captured
    with pytest.raises(GraphStateError, match="before a capture"):
        graph.replay()


# --- inputs, outputs, aliasing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 13), (7, 13), (2, 5, 13)])
def test_replay_with_new_inputs_matches_eager(
    model: CountingMLP, rng: torch.Generator, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    model = model.to(dtype)
    x = torch.randn(*shape, generator=rng).to(dtype)
    graph = CUDAGraph()
    with torch.inference_mode():
        graph.capture(model, inputs=(x,))
        for _ in range(3):
            new = torch.randn(*shape, generator=rng).to(dtype)
            got = graph.replay(new)
            assert_close(got, model(new))
            assert_close(x, new, name="static input")  # the new data was copied into the static input


def test_non_contiguous_new_inputs_are_copied(model: CountingMLP, rng: torch.Generator) -> None:
    x = torch.randn(6, 13, generator=rng)
    graph = CUDAGraph()
    with torch.no_grad():
        graph.capture(model, inputs=(x,))
        new = torch.randn(13, 6, generator=rng).t()
        assert not new.is_contiguous()
        assert_close(graph.replay(new), model(new.contiguous()))


def test_none_keeps_an_input_and_several_inputs_are_copied_in_order(rng: torch.Generator) -> None:
    a, b = torch.randn(5, 3, generator=rng), torch.randn(3, generator=rng)
    graph = CUDAGraph()
    graph.capture(lambda p, q: p * q + q, inputs=(a, b))
    new_b = torch.randn(3, generator=rng)
    assert_close(graph.replay(None, new_b), a * new_b + new_b)
    new_a = torch.randn(5, 3, generator=rng)
    assert_close(graph.replay(new_a, None), new_a * new_b + new_b)


def test_outputs_alias_static_buffers_and_copy_detaches_them(model: CountingMLP, rng: torch.Generator) -> None:
    x = torch.randn(4, 13, generator=rng)
    graph = CUDAGraph()
    with torch.no_grad():
        graph.capture(model, inputs=(x,))
        first_input, second_input = torch.randn(4, 13, generator=rng), torch.randn(4, 13, generator=rng)
        kept = graph.replay(first_input, copy=True)
        first = graph.replay(first_input)
        second = graph.replay(second_input)
        assert first is second  # overwritten by the next replay
        assert_close(first, model(second_input))
        assert_close(kept, model(first_input))
        assert kept.data_ptr() != first.data_ptr()


def test_nested_output_structures_are_preserved(rng: torch.Generator) -> None:
    x = torch.randn(3, 4, generator=rng)

    def step(t: torch.Tensor) -> dict[str, Any]:
        return {
            "logits": t.sum(-1),
            "pair": Pair(t * 2, [t.relu(), (t.exp(), "tag")]),
            "steps": 7,
            "none": None,
        }

    graph = CUDAGraph()
    captured = graph.capture(step, inputs=(x,))
    new = torch.randn(3, 4, generator=rng)
    result = graph.replay(new)
    assert result is captured
    assert set(result) == {"logits", "pair", "steps", "none"}
    assert isinstance(result["pair"], Pair)
    assert result["steps"] == 7 and result["none"] is None and result["pair"].gate[1][1] == "tag"
    assert_close(result["logits"], new.sum(-1))
    assert_close(result["pair"].hidden, new * 2)
    assert_close(result["pair"].gate[0], new.relu())
    assert_close(result["pair"].gate[1][0], new.exp())
    copied = graph.replay(new, copy=True)
    assert isinstance(copied["pair"], Pair) and copied["steps"] == 7
    assert copied["pair"].hidden.data_ptr() != result["pair"].hidden.data_ptr()
    cloned = clone_outputs(result)
    assert_close(cloned["pair"].gate[1][0], result["pair"].gate[1][0])
    assert cloned["logits"] is not result["logits"]


def test_an_output_that_is_the_input_is_kept(rng: torch.Generator) -> None:
    x = torch.randn(5, generator=rng)
    graph = CUDAGraph()
    graph.capture(lambda t: (t, t[1:]), inputs=(x,))
    new = torch.randn(5, generator=rng)
    whole, tail = graph.replay(new)
    assert whole is x
    assert_close(whole, new)
    assert_close(tail, new[1:])


# --- errors ----------------------------------------------------------------------------------------------------


def test_replay_before_capture() -> None:
    with pytest.raises(GraphStateError, match=r"replay\(\) called before a capture; capture first"):
        CUDAGraph().replay()


def test_capture_twice_needs_reset(rng: torch.Generator) -> None:
    graph = CUDAGraph()
    graph.capture(lambda: torch.ones(2))
    with pytest.raises(GraphStateError, match=r"already holds a capture; call graph\.reset\(\)"):
        graph.capture(lambda: torch.zeros(2))
    graph.reset()
    assert not graph.is_captured and graph.output is None
    x = torch.randn(3, generator=rng)
    graph.capture(torch.neg, inputs=(x,))
    assert_close(graph.replay(x), -x)


@pytest.mark.parametrize(
    ("new", "expected", "got"),
    [
        (torch.zeros(4, 3), r"\[4, 2\] float32 on cpu", r"\[4, 3\] float32 on cpu"),
        (torch.zeros(4, 2, dtype=torch.float64), r"float32", r"\[4, 2\] float64"),
        (torch.zeros(4, 2, device="meta"), r"on cpu", r"on meta"),
        (torch.zeros(8), r"\[4, 2\]", r"\[8\]"),
    ],
    ids=["shape", "dtype", "device", "rank"],
)
def test_input_mismatch_names_expected_and_got(new: torch.Tensor, expected: str, got: str) -> None:
    x = torch.zeros(4, 2)
    graph = CUDAGraph()
    graph.capture(torch.sin, inputs=(x,))
    with pytest.raises(GraphInputError, match=rf"expected replay input 0 to match .*{expected}.*got .*{got}") as info:
        graph.replay(new)
    assert isinstance(info.value, ValueError)  # a ConfigurationError


def test_input_count_and_type_errors(rng: torch.Generator) -> None:
    graph = CUDAGraph()
    graph.capture(torch.cos, inputs=(torch.randn(3, generator=rng),))
    with pytest.raises(GraphInputError, match=r"expected 1 replay inputs, got 2"):
        graph.replay(torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match=r"expected replay input 0 to be a torch\.Tensor or None, got list"):
        graph.replay([1.0, 2.0, 3.0])  # type: ignore[arg-type]
    closure = CUDAGraph()
    closure.capture(lambda: torch.ones(1))
    with pytest.raises(GraphInputError, match=r"no static inputs: capture with inputs="):
        closure.replay(torch.ones(1))


def test_static_inputs_are_checked_at_capture() -> None:
    with pytest.raises(TypeError, match=r"got a single tensor; write inputs=\(x,\)"):
        CUDAGraph().capture(torch.sin, inputs=torch.zeros(2))  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"expected inputs\[1\] to be a torch\.Tensor, got int"):
        CUDAGraph().capture(torch.add, inputs=(torch.zeros(2), 3))  # type: ignore[arg-type]
    with pytest.raises(GraphInputError, match=r"one device, got inputs\[0\] on cpu, inputs\[1\] on meta"):
        CUDAGraph().capture(torch.add, inputs=(torch.zeros(2), torch.zeros(2, device="meta")))
    with pytest.raises(TypeError, match="expected fn to be callable"):
        CUDAGraph().capture(3)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="GraphCaptureConfig"):
        CUDAGraph({"warmup_iters": 3})  # type: ignore[arg-type]


def test_changing_output_shapes_cannot_be_graphed(rng: torch.Generator) -> None:
    x = torch.randn(16, generator=rng)
    graph = CUDAGraph()
    graph.capture(lambda t: t[t > 0], inputs=(x,), warmup=False)
    new = torch.randn(16, generator=rng).abs() + 1.0  # all positive: a different output size
    if int((x > 0).sum()) == 16:
        new = -new
    with pytest.raises(GraphCaptureError, match=r"\[dynamic-output\].*pad to a fixed maximum") as info:
        graph.replay(new)
    assert info.value.rule == "dynamic-output"


def test_a_capture_inside_a_capture_is_refused(rng: torch.Generator) -> None:
    inner = CUDAGraph()
    x = torch.randn(3, generator=rng)
    with pytest.raises(GraphCaptureError, match=r"\[nested-capture\]") as info, CUDAGraph().capture():
        inner.capture(torch.sin, inputs=(x,))
    assert info.value.rule == "nested-capture"
    assert isinstance(info.value, LlamaTelemetryError)
    assert isinstance(info.value, RuntimeError)
    inner.capture(torch.sin, inputs=(x,))  # the thread is no longer marked as capturing
    assert_close(inner.replay(x), torch.sin(x))


def test_cpu_inputs_are_refused_where_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_runtime, "cuda_available", lambda: True)
    calls = []
    with pytest.raises(GraphCaptureError, match=r"\[cpu-tensor\].*inputs\[0\] is on cpu.*\.to\('cuda'\)"):
        CUDAGraph().capture(lambda t: calls.append(t), inputs=(torch.zeros(2),))
    assert calls == []  # refused before any warm-up


def test_block_form_reports_its_own_state(rng: torch.Generator) -> None:
    graph = CUDAGraph()
    with graph.capture():
        with pytest.raises(GraphStateError, match="inside the capture"):
            graph.replay()
        with pytest.raises(GraphCaptureError, match="nested-capture"):
            graph.capture(torch.sin, inputs=(torch.randn(2, generator=rng),))
        with pytest.raises(GraphStateError, match="cannot reset"):
            graph.reset()


# --- module-level helpers ----------------------------------------------------------------------------------------


def test_capture_graph_warms_up_and_replay_graph_replays(model: CountingMLP, rng: torch.Generator) -> None:
    x = torch.randn(2, 13, generator=rng)
    with torch.no_grad():
        graph = capture_graph(lambda: model(x), warmup_iters=3)
        assert model.calls == 4
        output = graph.replay()
        assert_close(output, model(x))
        x.copy_(torch.randn(2, 13, generator=rng))
        assert_close(replay_graph(graph), model(x))
        with_inputs = capture_graph(model, warmup_iters=0, inputs=(x,), config=GraphCaptureConfig(warmup_iters=9))
        new = torch.randn(2, 13, generator=rng)
        assert_close(replay_graph(with_inputs, new, copy=True), model(new))
    with pytest.raises(TypeError, match="expected a llamatelemetry CUDAGraph"):
        replay_graph(torch.cuda.CUDAGraph)  # type: ignore[arg-type]


def test_memory_usage_without_cuda_counts_the_kept_outputs(rng: torch.Generator) -> None:
    x = torch.randn(10, 6, generator=rng)
    graph = CUDAGraph()
    assert graph.memory_usage().reserved_bytes == 0
    graph.capture(lambda t: ((doubled := t * 2), doubled[0]), inputs=(x,))
    usage = graph.memory_usage()
    assert usage.reserved_bytes == 10 * 6 * 4  # a view shares its base's storage: counted once
    assert usage.allocated_bytes == usage.reserved_bytes and "no CUDA graph pool" in usage.method
    assert graph.pool_handle is None and graph.device is None
    assert "eager emulation" in repr(graph)


def test_grad_and_inference_modes_do_not_leak_into_replays(model: CountingMLP, rng: torch.Generator) -> None:
    x = torch.randn(2, 13, generator=rng)
    with torch.inference_mode():
        in_inference = CUDAGraph()
        in_inference.capture(model, inputs=(x.clone(),))
    new = torch.randn(2, 13, generator=rng)
    got = in_inference.replay(new)  # outside inference mode, parameters requiring grad
    with torch.no_grad():
        assert_close(got, model(new))
    with_grad = CUDAGraph()
    captured = with_grad.capture(model, inputs=(x,))
    assert captured.requires_grad  # captured with autograd on: the capture-time history is all it has
    replayed = with_grad.replay(new)
    with torch.no_grad():
        assert_close(replayed, model(new))
