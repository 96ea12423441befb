"""On a real GPU: matmul_tensor_core numerics against fp64, alignment padding, out=, and the model helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from llamatelemetry_core import get_device_info, record_selections
from llamatelemetry_tensorcore import enable_tensor_cores, matmul_tensor_core, optimize_for_tensor_cores
from llamatelemetry_tensorcore._flags import snapshot_flags

CheckMatmul = Callable[..., None]
KernelLaunches = Callable[[str], Any]  # the kernel_launches fixture (conftest.py)
pytestmark = pytest.mark.gpu


def _randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)


@pytest.mark.parametrize(("m", "k", "n"), [(256, 512, 128), (1023, 777, 1001), (1, 4096, 1), (129, 65, 33)])
def test_fp16_numerics_and_alignment_padding(check_matmul: CheckMatmul, m: int, k: int, n: int) -> None:
    a, b = _randn(m, k, seed=m), _randn(k, n, seed=n)
    with record_selections() as rec:
        c = matmul_tensor_core(a, b, dtype=torch.float16, backend="tensor_core")
    assert rec.last("matmul_tensor_core") == "tensor_core"
    assert c.dtype == torch.float32 and c.shape == (m, n) and c.device == a.device and c.is_contiguous()
    check_matmul(c, a, b, torch.float16)


@pytest.mark.triton
@pytest.mark.sm75
@pytest.mark.parametrize(("m", "k", "n"), [(256, 512, 128), (1023, 777, 1001), (1, 4096, 1), (129, 65, 33)])
@pytest.mark.parametrize("scale", [1.0, 1e6, 1e-12])
def test_small_fp32_products_run_fused(check_matmul: CheckMatmul, m: int, k: int, n: int, scale: float) -> None:
    a, b = _randn(m, k, seed=m) * scale, _randn(k, n, seed=n)
    with record_selections() as rec:
        c = matmul_tensor_core(a, b, dtype=torch.float16)
    assert rec.last("matmul_tensor_core") == "fused"
    assert c.dtype == torch.float32 and c.shape == (m, n) and c.is_contiguous()
    check_matmul(c, a, b, torch.float16)
    cublas = matmul_tensor_core(a, b, dtype=torch.float16, backend="tensor_core")
    torch.testing.assert_close(c, cublas, rtol=2e-3, atol=2e-3 * float(cublas.abs().max()))


@pytest.mark.triton
@pytest.mark.sm75
@pytest.mark.parametrize(("m", "k", "n"), [(1, 4096, 4096), (4, 4096, 4096), (16, 2048, 8192), (3, 1000, 777)])
def test_skinny_fp32_products_split_k_where_the_grid_is_small(
    check_matmul: CheckMatmul, kernel_launches: KernelLaunches, m: int, k: int, n: int
) -> None:
    from llamatelemetry_tensorcore import _fused_kernels
    from llamatelemetry_tensorcore.fused_matmul import choose_fused_tiles, choose_split_k

    a, b = _randn(m, k, seed=m) * 1e5, _randn(k, n, seed=n) * 1e-3
    split = choose_split_k(m, n, k, 1, choose_fused_tiles(m, n, 1, a.device), a.device)
    if (m, k, n) == (1, 4096, 4096):
        assert split.splits > 1  # a decode GEMV has fewer output tiles than SMs on every GPU the fused path runs on
    launches = kernel_launches("split_sum_kernel").grids
    with record_selections() as rec:
        c = matmul_tensor_core(a, b, dtype=torch.float16)
    assert rec.last("matmul_tensor_core") == "fused" and len(launches) == (split.splits > 1)
    check_matmul(c, a, b, torch.float16)
    check_matmul(_fused_kernels.fused_matmul(a, b, None, splits=1), a, b, torch.float16)  # and without the split


@pytest.mark.sm80
def test_bf16_numerics(check_matmul: CheckMatmul) -> None:
    a, b = _randn(1023, 777, seed=1) * 1e20, _randn(777, 1001, seed=2)
    c = matmul_tensor_core(a, b, dtype=torch.bfloat16)
    check_matmul(c, a, b, torch.bfloat16)


def test_out_batched_and_broadcast(check_matmul: CheckMatmul) -> None:
    a, b = _randn(3, 1, 127, 61, seed=3), _randn(2, 61, 95, seed=4)
    out = torch.full((3, 2, 127, 95), float("nan"), device="cuda")
    assert matmul_tensor_core(a, b, out=out) is out
    check_matmul(out, a, b, torch.float16)


def test_range_scaling_on_gpu(check_matmul: CheckMatmul) -> None:
    a = _randn(300, 1001, seed=5) * 1e6
    b = _randn(1001, 77, seed=6).abs() * 300
    c = matmul_tensor_core(a, b)
    assert torch.isfinite(c).all()
    check_matmul(c, a, b, torch.float16)


def test_half_inputs_and_transposed_operands(check_matmul: CheckMatmul) -> None:
    a = _randn(512, 256, dtype=torch.float16, seed=7)
    b = _randn(384, 256, dtype=torch.float16, seed=8).t()
    c = matmul_tensor_core(a, b)
    assert c.dtype == torch.float16
    check_matmul(c, a, b, torch.float16)


def test_gradients_on_gpu() -> None:
    a = _randn(64, 96, seed=9).requires_grad_()
    b = _randn(96, 33, seed=10).requires_grad_()
    matmul_tensor_core(a, b).sum().backward()  # type: ignore[no-untyped-call]
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, b.detach().sum(1).expand(64, 96), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(("m", "k", "n"), [(130, 70, 90), (1, 4096, 4096)])  # the second splits K (fused)
def test_capturable_in_a_cuda_graph(check_matmul: CheckMatmul, m: int, k: int, n: int) -> None:
    a, b = _randn(m, k, seed=11) * 1e5, _randn(k, n, seed=12)
    out = torch.empty(m, n, device="cuda")
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        matmul_tensor_core(a, b, out=out)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        matmul_tensor_core(a, b, out=out)
    a.mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    check_matmul(out, a, b, torch.float16)


def test_enable_tensor_cores_on_this_gpu() -> None:
    info = get_device_info()
    before = snapshot_flags()
    with enable_tensor_cores(torch.float16, allow_tf32=True) as config:
        assert config.tensor_cores == info.has_tensor_cores and torch.backends.cudnn.benchmark
        assert config.tf32_enabled is (True if info.supports_tf32 else None)
    assert snapshot_flags() == before


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.bn = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(self.norm(x))
        out: torch.Tensor = self.bn(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return out


@pytest.mark.parametrize("keep_fp32", [False, True])
def test_optimized_model_on_gpu(keep_fp32: bool) -> None:
    torch.manual_seed(0)
    first = _Block(64)
    model = nn.Sequential(first, _Block(64)).eval()
    x = torch.randn(4, 32, 64)
    with torch.no_grad():
        expected = model(x)
    optimize_for_tensor_cores(model, dtype=torch.float16, keep_fp32=keep_fp32)
    assert next(model.parameters()).is_cuda and not model.training and torch.backends.cudnn.benchmark
    assert first.proj.weight.dtype == torch.float16
    assert first.norm.weight.dtype == (torch.float32 if keep_fp32 else torch.float16)
    with torch.no_grad():
        got = model(x.cuda())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float().cpu(), expected, atol=2e-2, rtol=2e-2)


def test_pytorch_transformer_fast_path_with_keep_fp32() -> None:
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    optimize_for_tensor_cores(model, keep_fp32=True)
    with torch.no_grad():
        out = model(torch.randn(2, 16, 64, device="cuda"))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
