"""Which CUDA graph a launch is recorded into (``llamatelemetry_core.capture``); the GPU side is tested with the
captures of llamatelemetry-graphs and the kernels that use it."""

from __future__ import annotations

import pytest
import torch

from llamatelemetry_core.capture import capturing_graph, declare_capture


def test_nothing_is_capturing_outside_a_capture_even_when_declared() -> None:
    # A declaration only names the graph of a capture in progress: with no stream capturing, the answer is None.
    assert capturing_graph() is None
    with declare_capture(object()):
        assert capturing_graph() is None
    assert capturing_graph() is None


@pytest.mark.gpu
def test_a_declared_graph_is_the_answer_during_its_capture() -> None:
    graph, other = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    x = torch.ones(4, device="cuda")
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    with torch.cuda.stream(stream):
        x.add_(1)  # warm up outside the capture
    torch.cuda.synchronize()
    seen = []
    with declare_capture(other), torch.cuda.graph(graph):
        x.add_(1)
        seen.append(capturing_graph())
    assert seen == [other]
