"""Every public op of the component under ``torch.compile(fullgraph=True)``: no graph break, the eager result."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import llamatelemetry_triton as lt
from llamatelemetry_core.errors import BackendUnavailableError
from llamatelemetry_core.testing import assert_close

_W = torch.linspace(0.5, 1.5, 16)


def _rope(x: torch.Tensor) -> torch.Tensor:
    cos, sin = lt.rope_cos_sin(8, 16)
    q, k = lt.triton_rope(x.clone(), x[..., :1, :].clone(), cos, sin)
    return torch.cat([q, k], dim=-2)


_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "add": lambda x: lt.triton_add(x, x),
    "argmax": lambda x: lt.triton_argmax(x),
    "softmax": lambda x: lt.triton_softmax(x),
    "rmsnorm": lambda x: lt.triton_rmsnorm(x, _W),
    "layernorm": lambda x: lt.triton_layernorm(x, _W, _W - 1),
    "fused_add_rmsnorm": lambda x: lt.triton_fused_add_rmsnorm(x, x, _W)[0],
    "swiglu": lambda x: lt.triton_swiglu(x, x.flip(-1)),
    "geglu": lambda x: lt.triton_geglu(x, x.flip(-1)),
    "rope": _rope,
    # Three rows (the few-row kernels take them), and twelve (refused: F.linear in the graph).
    "linear": lambda x: lt.triton_linear(x[0, :3, 0], _W.expand(5, 16).contiguous()),
    "linear_many_rows": lambda x: lt.triton_linear(x, _W.expand(5, 16).contiguous()),
    "fused_add_rmsnorm_linear": lambda x: lt.triton_fused_add_rmsnorm_linear(x[0, :3, 0], x[0, :3, 1], _W, x[0, :5, 1])[
        0
    ],
    "rmsnorm_linear": lambda x: lt.triton_rmsnorm_linear(x[0, :2, 0], _W, x[0, :5, 1]),
    "swiglu_linear": lambda x: lt.triton_swiglu_linear(x[0, :2].reshape(2, 32), x[0, :5, 1]),
}


@pytest.mark.parametrize("name", sorted(_OPS))
def test_fullgraph_op_matches_eager(name: str) -> None:
    torch._dynamo.reset()
    x = torch.randn(1, 6, 2, 16, generator=torch.Generator().manual_seed(1))
    op = _OPS[name]
    compiled = torch.compile(op, fullgraph=True, backend="eager")
    assert_close(compiled(x), op(x), name=f"compiled {name}", dtype=torch.float32)


def test_an_impossible_request_raises_under_compile_as_it_does_eagerly() -> None:
    torch._dynamo.reset()
    x = torch.randn(3, 8, dtype=torch.float64)  # no kernel takes float64 (and on a CPU none runs uninterpreted)
    compiled = torch.compile(lambda t: lt.triton_softmax(t, backend="triton"), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="triton") as raised:
        compiled(x)
    error = raised.value
    assert isinstance(error, BackendUnavailableError) or isinstance(error.__context__, BackendUnavailableError)
