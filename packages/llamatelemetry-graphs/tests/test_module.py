"""enable_cuda_graphs: one graph per signature, a bound, eager calls for what must not be captured."""

from __future__ import annotations

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.testing import assert_close
from llamatelemetry_graphs import GraphCaptureConfig, GraphedModule, _runtime, enable_cuda_graphs

# The eager emulation, also on a GPU machine (CPU tensors there would otherwise be refused).
pytestmark = pytest.mark.usefixtures("eager_emulation")


class Block(torch.nn.Module):
    def __init__(self, width: int = 10) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Linear(width, width)
        self.calls = 0

    def forward(self, x: torch.Tensor, scale: float = 1.0, *, bias: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        y: torch.Tensor = x + self.mlp(self.norm(x)) * scale
        return y if bias is None else y + bias


@pytest.fixture
def block() -> Block:
    return Block().eval()


def test_one_graph_per_signature_and_replays_match_eager(block: Block, rng: torch.Generator) -> None:
    graphed = enable_cuda_graphs(block, config=GraphCaptureConfig(warmup_iters=2))
    assert isinstance(graphed, GraphedModule)
    with torch.inference_mode():
        for shape in [(3, 10), (3, 10), (5, 10), (3, 10), (1, 4, 10), (5, 10)]:
            x = torch.randn(*shape, generator=rng)
            assert_close(graphed(x), block(x))
    assert graphed.stats.captures == 3 and graphed.stats.replays == 3
    assert graphed.num_graphs == 3 and graphed.stats.eager_calls == {}
    assert len(graphed.signatures()) == 3


def test_dtype_kwargs_and_python_values_are_part_of_the_signature(block: Block, rng: torch.Generator) -> None:
    graphed = enable_cuda_graphs(block)
    x = torch.randn(2, 10, generator=rng)
    bias = torch.randn(10, generator=rng)
    with torch.no_grad():
        assert_close(graphed(x, 0.5), block(x, 0.5))
        assert_close(graphed(x, 2.0), block(x, 2.0))
        assert_close(graphed(x, 2.0, bias=bias), block(x, 2.0, bias=bias))
        new_bias = torch.randn(10, generator=rng)
        assert_close(graphed(x, 2.0, bias=new_bias), block(x, 2.0, bias=new_bias))  # replay copies kwargs too
        graphed.module.double()
        graphed.reset()
        assert_close(graphed(x.double()), block(x.double()))
    assert graphed.stats.captures == 4 and graphed.stats.replays == 1


def test_the_training_flag_is_part_of_the_signature(rng: torch.Generator) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Dropout(0.5))
    graphed = enable_cuda_graphs(model)
    x = torch.randn(4, 6, generator=rng)
    with torch.no_grad():
        model.eval()
        assert_close(graphed(x), model(x))
        model.train()
        graphed(x)
    assert graphed.stats.captures == 2


def test_the_bound_runs_further_signatures_eagerly(block: Block, rng: torch.Generator) -> None:
    graphed = enable_cuda_graphs(block, max_graphs=2)
    with torch.no_grad():
        for rows in (1, 2, 3, 4, 1, 2):
            x = torch.randn(rows, 10, generator=rng)
            assert_close(graphed(x), block(x))
    assert graphed.num_graphs == 2
    assert graphed.stats.eager_calls == {"graph limit reached": 2}
    assert graphed.stats.replays == 2
    with pytest.raises(ConfigurationError, match="max_graphs to be a positive integer, got 0"):
        enable_cuda_graphs(block, max_graphs=0)


def test_autograd_calls_run_eagerly(block: Block, rng: torch.Generator) -> None:
    graphed = enable_cuda_graphs(block)
    x = torch.randn(2, 10, generator=rng, requires_grad=True)
    out = graphed(x)
    out.sum().backward()
    assert x.grad is not None
    block.requires_grad_(False)
    y = torch.randn(2, 10, generator=rng, requires_grad=True)
    graphed(y)
    assert graphed.stats.eager_calls == {"requires grad": 2}
    assert graphed.num_graphs == 0
    graphed(y.detach())  # grad mode on, but nothing requires grad: captured
    assert graphed.num_graphs == 1


def test_cpu_tensors_run_eagerly_where_cuda_is_available(
    block: Block, rng: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_runtime, "cuda_available", lambda: True)
    graphed = enable_cuda_graphs(block)
    x = torch.randn(2, 10, generator=rng)
    with torch.no_grad():
        assert_close(graphed(x), block(x))
    assert graphed.stats.eager_calls == {"cpu tensor": 1} and graphed.num_graphs == 0


def test_unhashable_arguments_and_mixed_devices_run_eagerly(rng: torch.Generator) -> None:
    class Takes(torch.nn.Module):
        def forward(self, x: torch.Tensor, extra: object) -> torch.Tensor:
            return x * 2

    graphed = enable_cuda_graphs(Takes())
    x = torch.randn(3, generator=rng)
    assert_close(graphed(x, {"a": [1, 2]}), x * 2)  # a list inside a dict is walked; the dict is hashable by key
    assert_close(graphed(x, frozenset({1, 2})), x * 2)  # a hashable leaf: part of the signature
    assert_close(graphed(x, bytearray(b"ab")), x * 2)  # unhashable leaf
    meta = torch.empty(3, device="meta")
    graphed(x, meta)
    assert graphed.stats.eager_calls == {"unhashable argument": 1, "tensors on several devices": 1}


def test_outputs_are_copies_unless_asked_otherwise(block: Block, rng: torch.Generator) -> None:
    x1, x2 = torch.randn(2, 10, generator=rng), torch.randn(2, 10, generator=rng)
    with torch.no_grad():
        safe = enable_cuda_graphs(block)
        a, b = safe(x1), safe(x2)
        assert_close(a, block(x1))
        assert_close(b, block(x2))
        fast = enable_cuda_graphs(block, copy_outputs=False)
        c, d = fast(x1), fast(x2)
        assert c is d  # the static output, overwritten by the second call
        assert_close(c, block(x2))


def test_a_call_inside_a_capture_runs_eagerly(block: Block, rng: torch.Generator) -> None:
    from llamatelemetry_graphs import CUDAGraph

    graphed = enable_cuda_graphs(block)
    x = torch.randn(2, 10, generator=rng)
    with torch.no_grad():
        graph = CUDAGraph()
        graph.capture(graphed, inputs=(x,), warmup=False)
    assert graphed.stats.eager_calls == {"inside another capture": 1}


def test_wrapping_needs_a_module_and_exposes_it(block: Block) -> None:
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module to wrap, got function"):
        enable_cuda_graphs(lambda x: x)  # type: ignore[arg-type]
    graphed = enable_cuda_graphs(block)
    assert graphed.module is block
    assert set(graphed.state_dict()) == {f"module.{k}" for k in block.state_dict()}
    assert graphed.memory_usage().reserved_bytes == 0
