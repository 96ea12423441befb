from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from llamatelemetry_core import simulate_device
from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_tensorcore import PRECISION_SENSITIVE, TensorCoreWarning, optimize_for_tensor_cores, plan_model
from llamatelemetry_tensorcore._flags import snapshot_flags


class Block(nn.Module):
    """A tiny transformer-ish block: norm, attention-like mixing, MLP, a BatchNorm over features."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)
        self.softmax = nn.Softmax(dim=-1)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.bn = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor, *, gate: torch.Tensor | None = None) -> torch.Tensor:
        h = self.softmax(self.mix(self.norm(x))) * x
        h = h + self.mlp(h)
        if gate is not None:
            h = h * gate
        out: torch.Tensor = self.bn(h)
        return out


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block(), nn.Linear(16, 4))
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(64, 16))
    return model


@pytest.mark.filterwarnings("ignore::llamatelemetry_tensorcore.TensorCoreWarning")
def test_bf16_cpu_model_is_bf16_working_and_in_eval_mode() -> None:
    model = _model()
    x = torch.randn(8, 16)
    expected = model.eval()(x)
    with simulate_device("cpu-bf16"):
        optimized = optimize_for_tensor_cores(model.train(), dtype=torch.float16)
    assert optimized is model and not optimized.training
    assert all(p.dtype == torch.bfloat16 for p in optimized.parameters())
    got = optimized(x)  # fp32 input: cast by the root pre-hook
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("cpu", ["cpu", "cpu-bf16"])
def test_cpu_warns_instead_of_raising(cpu: str) -> None:
    with simulate_device(cpu), pytest.warns(TensorCoreWarning, match="no CUDA device"):
        optimize_for_tensor_cores(nn.Linear(4, 4))


@pytest.mark.parametrize("keep_fp32", [False, True])
def test_cpu_without_bf16_keeps_the_model_in_fp32_and_in_eval_mode(keep_fp32: bool) -> None:
    model = _model()
    x = torch.randn(8, 16)
    expected = model.eval()(x)
    with simulate_device("cpu"), pytest.warns(TensorCoreWarning, match="no bfloat16 on this CPU"):
        optimized = optimize_for_tensor_cores(model.train(), dtype=torch.bfloat16, keep_fp32=keep_fp32)
    assert optimized is model and not optimized.training
    assert all(t.dtype == torch.float32 for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    torch.testing.assert_close(optimized(x), expected, atol=0, rtol=0)


@pytest.mark.parametrize(("cpu", "compute"), [("cpu", None), ("cpu-bf16", torch.bfloat16)])
def test_plan_on_each_simulated_cpu(cpu: str, compute: torch.dtype | None) -> None:
    with simulate_device(cpu) as info:
        plan = plan_model(info, torch.float16)
    assert plan.device_kind == "cpu" and plan.compute_dtype == compute and not plan.cudnn_benchmark
    assert plan.warning is not None and "no CUDA device" in plan.warning


@pytest.mark.filterwarnings("ignore::llamatelemetry_tensorcore.TensorCoreWarning")
def test_kept_fp32_modules_run_between_low_precision_ones() -> None:
    model = _model()
    x = torch.randn(8, 16)
    expected = model.eval()(x)
    with simulate_device("cpu-bf16"):
        optimize_for_tensor_cores(model, keep_fp32=True)
    block = model[0]  # type: ignore[index]
    assert isinstance(block, Block)
    for kept in (block.norm, block.bn):
        assert all(t.dtype == torch.float32 for t in [*kept.parameters(), *kept.buffers()] if t.is_floating_point())
    assert block.mix.weight.dtype == torch.bfloat16
    assert block.bn.running_mean is not None and block.bn.running_mean.dtype == torch.float32
    assert block.bn.num_batches_tracked is not None and block.bn.num_batches_tracked.dtype == torch.int64
    seen: dict[str, torch.dtype] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            seen.setdefault(name, args[0].dtype)

        return hook

    block.norm.register_forward_hook(record("norm_in"))
    block.mix.register_forward_hook(record("mix_in"))
    got = model(x)
    assert seen == {"norm_in": torch.float32, "mix_in": torch.bfloat16}
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=0.1, rtol=0.05)


@pytest.mark.filterwarnings("ignore::llamatelemetry_tensorcore.TensorCoreWarning")
def test_keep_fp32_by_class_kwargs_and_repeated_calls() -> None:
    block = Block()
    with simulate_device("cpu-bf16"):
        optimize_for_tensor_cores(block, keep_fp32=[nn.LayerNorm])
        optimize_for_tensor_cores(block, keep_fp32=[nn.LayerNorm])  # hooks are replaced, not stacked
    assert block.norm.weight.dtype == torch.float32 and block.bn.weight.dtype == torch.bfloat16
    assert len(block.norm._forward_pre_hooks) == 1 and len(block._forward_pre_hooks) == 1
    out = block(torch.randn(4, 16), gate=torch.rand(4, 16))  # a floating keyword input is cast too
    assert out.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore::llamatelemetry_tensorcore.TensorCoreWarning")
def test_norms_inside_pytorch_transformer_layers_are_not_kept() -> None:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    with simulate_device("cpu-bf16"):
        optimize_for_tensor_cores(nn.Sequential(layer, nn.LayerNorm(16)), keep_fp32=True)
    assert layer.norm1.weight.dtype == torch.bfloat16
    with torch.no_grad():
        layer(torch.randn(2, 5, 16, dtype=torch.bfloat16))


@pytest.mark.filterwarnings("ignore::llamatelemetry_tensorcore.TensorCoreWarning")
def test_integer_inputs_are_left_alone() -> None:
    model = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with simulate_device("cpu-bf16"):
        optimize_for_tensor_cores(model, keep_fp32=True)
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16


def test_a_kept_root_module() -> None:
    norm = nn.LayerNorm(8)
    with simulate_device("cpu-bf16"), pytest.warns(TensorCoreWarning):
        optimize_for_tensor_cores(norm, keep_fp32=True)
    assert norm.weight.dtype == torch.float32
    assert norm(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("cpu", ["cpu", "cpu-bf16"])
def test_cpu_does_not_touch_global_switches(cpu: str) -> None:
    before = snapshot_flags()
    with simulate_device(cpu), pytest.warns(TensorCoreWarning):
        optimize_for_tensor_cores(nn.Linear(2, 2))
    assert snapshot_flags() == before


@pytest.mark.parametrize(
    ("key", "dtype", "expected"),
    [
        ("t4", torch.float16, torch.float16),
        ("v100", torch.float16, torch.float16),
        ("a100", torch.bfloat16, torch.bfloat16),
        ("h100", torch.float16, torch.float16),
        ("b200", torch.bfloat16, torch.bfloat16),
    ],
)
def test_plans_on_simulated_gpus(key: str, dtype: torch.dtype, expected: torch.dtype) -> None:
    with simulate_device(key) as info:
        plan = plan_model(info, dtype)
    assert plan.device_kind == "cuda" and plan.compute_dtype == expected and plan.cudnn_benchmark
    assert plan.warning is None


def test_bf16_plan_on_t4_warns_or_raises() -> None:
    with simulate_device("t4") as info:
        with pytest.warns(TensorCoreWarning, match="float16 is used instead"):
            assert plan_model(info, torch.bfloat16).compute_dtype == torch.float16
        with pytest.raises(CapabilityError):
            plan_model(info, torch.bfloat16, strict=True)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match=r"expected model to be a torch\.nn\.Module"):
        optimize_for_tensor_cores("model")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="expected dtype"):
        optimize_for_tensor_cores(nn.Linear(2, 2), dtype=torch.float32)
    with pytest.raises(ConfigurationError, match="keep_fp32"):
        optimize_for_tensor_cores(nn.Linear(2, 2), keep_fp32=[int])  # type: ignore[list-item]
    if not torch.cuda.is_available():
        with pytest.raises(CapabilityError, match="CUDA is not available"):
            optimize_for_tensor_cores(nn.Linear(2, 2), device="cuda")


def test_precision_sensitive_covers_the_norms() -> None:
    for cls in (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm1d, nn.Softmax):
        assert cls in PRECISION_SENSITIVE
