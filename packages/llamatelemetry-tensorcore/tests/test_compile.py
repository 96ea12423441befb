"""``matmul_tensor_core`` under ``torch.compile(fullgraph=True)``: no graph break, the eager result."""

from __future__ import annotations

import pytest
import torch

from llamatelemetry_tensorcore import matmul_tensor_core


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fullgraph_matmul_matches_eager(dtype: torch.dtype) -> None:
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 5, 7, generator=gen), torch.randn(7, 3, generator=gen)
    compiled = torch.compile(lambda x, y: matmul_tensor_core(x, y, dtype=dtype), fullgraph=True, backend="eager")
    assert torch.equal(compiled(a, b), matmul_tensor_core(a, b, dtype=dtype))
