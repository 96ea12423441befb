"""Fuzzing graph capture and replay with hostile programs and inputs (see ``llamatelemetry_core.testing.fuzz``).

A graphed module must behave exactly like its eager twin over any sequence of calls, whatever it updates in place
(its inputs, its buffers, BatchNorm statistics in training mode); replays with inputs of the wrong shape, dtype
or type, and configurations out of range, must raise typed errors naming the argument. Runs on the eager
emulation everywhere and on real CUDA graphs where a GPU is present.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamatelemetry_core.testing import assert_close
from llamatelemetry_core.testing.fuzz import TensorSpec, check_call, fuzz_settings, make_tensor, tensor_specs
from llamatelemetry_graphs import CUDAGraph, GraphCaptureConfig, _runtime, enable_cuda_graphs

DEVICES = ["emulated", pytest.param("cuda", marks=pytest.mark.gpu)]
STEPS = ("pure", "add_to_input", "scatter_into_buffer", "batchnorm", "count_calls")


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param != "emulated":
        yield "cuda"
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_runtime, "cuda_available", lambda: False)
        yield "cpu"


class Program(torch.nn.Module):
    """A module running a drawn list of steps on ``(x, state)``, some of them in place."""

    cache: torch.Tensor
    calls: torch.Tensor

    def __init__(self, steps: list[str], width: int) -> None:
        super().__init__()
        self.steps = steps
        self.linear = torch.nn.Linear(width, width)
        self.norm = torch.nn.BatchNorm1d(width)
        self.register_buffer("cache", torch.zeros(4, width))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.linear(x)
        for step in self.steps:
            if step == "add_to_input":
                state.add_(y[: state.shape[0]])
            elif step == "scatter_into_buffer":
                self.cache.index_copy_(0, torch.arange(min(2, y.shape[0]), device=y.device), y[:2])
                y = y + self.cache.sum(0)
            elif step == "batchnorm" and y.shape[0] > 1:
                y = self.norm(y)
            elif step == "count_calls":
                self.calls.add_(1)
            y = y * 0.5 + state.sum()
        return y


@fuzz_settings(ci=15)
@given(
    steps=st.lists(st.sampled_from(STEPS), min_size=1, max_size=4),
    rows=st.lists(st.sampled_from([2, 3]), min_size=1, max_size=5),
    training=st.booleans(),
    inference=st.booleans(),
    warmup=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_graphed_module_equals_its_eager_twin(
    device: str, steps: list[str], rows: list[int], training: bool, inference: bool, warmup: int, seed: int
) -> None:
    torch.manual_seed(seed)
    width = 4
    eager = Program(steps, width).to(device).train(training)
    module = copy.deepcopy(eager)
    graphed = enable_cuda_graphs(module, config=GraphCaptureConfig(warmup_iters=warmup))
    gen = torch.Generator().manual_seed(seed)
    context = torch.inference_mode if inference else torch.no_grad
    with context():
        state_eager = torch.zeros(2, width, device=device)
        state_graphed = torch.zeros(2, width, device=device)
        for i, n in enumerate(rows):
            x = torch.randn(n, width, generator=gen).to(device)
            want = eager(x, state_eager)
            got = graphed(x, state_graphed)
            assert_close(got, want, name=f"output of call {i}")
            assert_close(state_graphed, state_eager, name=f"input updated in place, call {i}")
            for name, buffer in eager.named_buffers():
                assert_close(dict(module.named_buffers())[name], buffer, name=f"buffer {name}, call {i}")
    assert graphed.stats.captures == len(set(rows))


@fuzz_settings(ci=30)
@given(
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    new_shape=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    spec=tensor_specs([torch.float32, torch.float16, torch.int64]),
    kind=st.sampled_from(["tensor", "none", "list", "number"]),
)
def test_replay_inputs(device: str, shape: list[int], new_shape: list[int], spec: TensorSpec, kind: str) -> None:
    static = torch.randn(shape, device=device)
    graph = CUDAGraph()
    with torch.no_grad():
        graph.capture(lambda t: t * 2 + 1, inputs=(static,))
        new = make_tensor(new_shape, spec, device=device)
        given: object = {"tensor": new, "none": None, "list": [new], "number": 3.0}[kind]
        before = new.clone()

        def reference() -> torch.Tensor:
            source = static if given is None else new
            return source.to(static.dtype) * 2 + 1

        outcome = check_call(
            lambda: graph.replay(given),  # type: ignore[arg-type]
            reference,
            arguments=["replay input", "input 0"],
            name="replay",
        )
        valid = kind == "none" or (kind == "tensor" and new_shape == shape and spec.dtype == torch.float32)
        assert outcome.raised != valid
        assert torch.equal(new, before) or bool(new.isnan().any())


@fuzz_settings(ci=30)
@given(
    warmup=st.one_of(st.integers(-2, 5), st.sampled_from([1.5, True, "3", None])),
    mode=st.sampled_from(["global", "thread_local", "relaxed", "everything", 3]),
    pool=st.sampled_from([None, (0, 1), (1,), "pool", (1.5, 2)]),
)
def test_capture_config(warmup: object, mode: object, pool: object) -> None:
    outcome = check_call(
        lambda: GraphCaptureConfig(warmup_iters=warmup, capture_error_mode=mode, pool=pool),  # type: ignore[arg-type]
        None,
        arguments=["warmup_iters", "capture_error_mode", "pool"],
        name="GraphCaptureConfig",
    )
    valid = (
        isinstance(warmup, int)
        and not isinstance(warmup, bool)
        and warmup >= 0
        and mode in ("global", "thread_local", "relaxed")
        and (pool is None or pool == (0, 1))
    )
    assert outcome.raised != valid
