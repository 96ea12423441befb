"""enable_cuda_graphs keeps in-place updates exactly as eager calls make them: inputs and module state.

Each test runs on the eager emulation and, where CUDA is present, on real graphs (``device`` parameter).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from llamatelemetry_core.testing import assert_close
from llamatelemetry_graphs import GraphCaptureConfig, _runtime, enable_cuda_graphs

DEVICES = ["emulated", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "emulated":
        monkeypatch.setattr(_runtime, "cuda_available", lambda: False)
        yield "cpu"
    else:
        yield "cuda"


class Accumulate(torch.nn.Module):
    """A decode step's cache update: ``cache += x``, returning ``cache * 2``."""

    def forward(self, cache: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cache.add_(x)
        return cache * 2


class IndexedCache(torch.nn.Module):
    """A KV cache held by the module, written at a position given by the caller."""

    cache: torch.Tensor

    def __init__(self, slots: int, width: int) -> None:
        super().__init__()
        self.register_buffer("cache", torch.zeros(slots, width))

    def forward(self, position: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        self.cache.index_copy_(0, position, value)
        return self.cache.sum(0)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_inputs_updated_in_place_are_updated_in_the_callers_tensors(device: str, mode: str) -> None:
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        eager_cache = torch.zeros(4, device=device)
        graphed_cache = torch.zeros(4, device=device)
        graphed = enable_cuda_graphs(Accumulate(), config=GraphCaptureConfig(warmup_iters=3))
        for step in range(4):
            x = torch.full((4,), float(step + 1), device=device)
            want = Accumulate()(eager_cache, x)
            got = graphed(graphed_cache, x)
            assert_close(got, want, name=f"output at step {step}")
            assert_close(graphed_cache, eager_cache, name=f"cache at step {step}")
        other = torch.ones(4, device=device)  # another cache tensor of the same signature: updated too
        assert_close(graphed(other, x), Accumulate()(torch.ones(4, device=device), x))
        assert_close(other, torch.ones(4, device=device) + x)
    assert graphed.stats.captures == 1 and graphed.stats.replays == 4
    assert_close(eager_cache, torch.full((4,), 10.0, device=device))


def test_module_buffers_updated_in_place_are_updated_once_per_call(device: str) -> None:
    eager = IndexedCache(6, 3).to(device)
    module = IndexedCache(6, 3).to(device)
    graphed = enable_cuda_graphs(module)
    with torch.inference_mode():
        for step in range(5):
            position = torch.tensor([step], device=device)
            value = torch.full((1, 3), float(step + 1), device=device)
            assert_close(graphed(position, value), eager(position, value), name=f"step {step}")
            assert_close(module.cache, eager.cache, name=f"cache at step {step}")
    assert graphed.stats.replays == 4


def _buffer(module: torch.nn.Module, name: str) -> torch.Tensor:
    return dict(module.named_buffers())[name]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_training_mode_batchnorm_statistics_advance_once_per_call(device: str, mode: str) -> None:
    torch.manual_seed(0)
    eager = torch.nn.BatchNorm1d(5).to(device).train()
    module = torch.nn.BatchNorm1d(5).to(device).train()
    graphed = enable_cuda_graphs(module, config=GraphCaptureConfig(warmup_iters=3))
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    gen = torch.Generator().manual_seed(1)
    with context():
        for step in range(3):
            x = torch.randn(8, 5, generator=gen).to(device)
            assert_close(graphed(x), eager(x), name=f"output at step {step}")
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                assert_close(_buffer(module, name), _buffer(eager, name), name=f"{name} at step {step}")
            assert int(_buffer(module, "num_batches_tracked")) == step + 1


def test_a_module_that_writes_nothing_copies_nothing_back(device: str) -> None:
    model = torch.nn.Linear(4, 4).to(device).eval()
    graphed = enable_cuda_graphs(model)
    x = torch.randn(2, 4, device=device)
    before = x.clone()
    with torch.inference_mode():
        graphed(x)
        graphed(x)
    assert graphed._written_inputs and all(not w for w in graphed._written_inputs.values())
    assert torch.equal(x, before)
