"""``optimize_for_tensor_cores``: a model ready for Tensor Core inference, with working dtype boundaries.

The model moves to the GPU, its parameters and buffers are cast to fp16 or bf16 so that its matmuls and
convolutions run on Tensor Cores, cuDNN benchmark mode is enabled, and it is returned in eval mode.

With ``keep_fp32``, normalization layers and other precision-sensitive modules (:data:`PRECISION_SENSITIVE`)
keep fp32 weights. For the model to still run, each kept module gets two hooks: a forward pre-hook that casts
its floating inputs to fp32 and a forward hook that casts its floating outputs back to the compute dtype.
Norms inside PyTorch's own ``nn.TransformerEncoderLayer``/``nn.TransformerDecoderLayer`` are not kept: those
layers may hand the norm weights straight to a fused kernel, bypassing the hooks (their LayerNorm kernels
accumulate in fp32 anyway).

Without a GPU there are no Tensor Cores: the model stays on the CPU, in bf16 where the CPU supports it
(otherwise unchanged), and a :class:`~llamatelemetry_tensorcore.config.TensorCoreWarning` says so.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from llamatelemetry_core.device import DeviceInfo
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import dtype_name
from llamatelemetry_tensorcore._device import runtime_device
from llamatelemetry_tensorcore._flags import set_flags
from llamatelemetry_tensorcore.config import REDUCED_DTYPES, TensorCoreWarning, resolve_compute_dtype

__all__ = ["PRECISION_SENSITIVE", "ModelPlan", "optimize_for_tensor_cores", "plan_model"]

logger = logging.getLogger(__name__)

PRECISION_SENSITIVE: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softmin,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
"""Modules kept in fp32 by ``keep_fp32=True``: normalizations (statistics over many values) and softmaxes."""

_FUSED_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_HOOKS_ATTR = "_llamatelemetry_tensorcore_hooks"


@dataclass(frozen=True)
class ModelPlan:
    """What :func:`optimize_for_tensor_cores` does on one device: ``compute_dtype`` ``None`` keeps dtypes."""

    device_kind: str
    compute_dtype: torch.dtype | None
    cudnn_benchmark: bool
    warning: str | None = None


def plan_model(info: DeviceInfo, dtype: torch.dtype = torch.float16, *, strict: bool = False) -> ModelPlan:
    """The plan of :func:`optimize_for_tensor_cores` for ``info`` (pure; warns for bf16 on a T4-class GPU)."""
    if dtype not in REDUCED_DTYPES:
        raise ConfigurationError(f"expected dtype torch.float16 or torch.bfloat16, got {dtype!r}")
    if not info.is_cuda:
        if info.supports_bf16:
            why = f"the model stays on the CPU in bfloat16 (asked for {dtype_name(dtype)})"
            return ModelPlan("cpu", torch.bfloat16, False, f"no CUDA device, so no Tensor Cores: {why}")
        return ModelPlan("cpu", None, False, "no CUDA device and no bfloat16 on this CPU: the model is unchanged")
    if not info.has_tensor_cores:
        cc = info.compute_capability
        return ModelPlan(
            "cuda",
            None,
            True,
            f"{info.name} (compute capability {cc}) has no Tensor Cores: the model moves to it in its own dtype",
        )
    return ModelPlan("cuda", resolve_compute_dtype(info, dtype, strict=strict), True)


def _cast_floating(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor in it (through tuples, lists and dicts) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple):
        items = [_cast_floating(v, dtype) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_cast_floating(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_floating(v, dtype) for k, v in value.items()}
    return value


class _CastInputs:
    """Forward pre-hook (with kwargs): floating inputs become ``dtype``."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return _cast_floating(args, self.dtype), _cast_floating(kwargs, self.dtype)


class _CastOutputs:
    """Forward hook: floating outputs become ``dtype``."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return _cast_floating(output, self.dtype)


def _set_hooks(module: nn.Module, handles: list[RemovableHandle]) -> None:
    for old in getattr(module, _HOOKS_ATTR, []):
        old.remove()
    setattr(module, _HOOKS_ATTR, handles)


def _cast_own_tensors(module: nn.Module, dtype: torch.dtype) -> None:
    for param in module.parameters(recurse=False):
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            if param.grad is not None:
                param.grad = None  # a gradient of the old dtype could not be accumulated into
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer.is_floating_point() and buffer.dtype != dtype:
            setattr(module, name, buffer.to(dtype))


def _cast_tree(
    module: nn.Module,
    dtype: torch.dtype,
    keep: tuple[type[nn.Module], ...],
    inside_fused: bool,
    kept: list[str],
    path: str,
) -> None:
    if keep and isinstance(module, keep) and not inside_fused:
        module.float()
        _set_hooks(
            module,
            [
                module.register_forward_pre_hook(_CastInputs(torch.float32), with_kwargs=True),
                module.register_forward_hook(_CastOutputs(dtype)),
            ],
        )
        kept.append(path or type(module).__name__)
        return
    _cast_own_tensors(module, dtype)
    fused = isinstance(module, _FUSED_LAYERS)
    for name, child in module.named_children():
        _cast_tree(child, dtype, keep, fused, kept, f"{path}.{name}" if path else name)


def _is_module_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, nn.Module)


def _keep_types(keep_fp32: bool | Sequence[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    if isinstance(keep_fp32, bool):
        return PRECISION_SENSITIVE if keep_fp32 else ()
    types = tuple(keep_fp32)
    bad = [t for t in types if not _is_module_class(t)]
    if bad:
        raise ConfigurationError(f"expected keep_fp32 to be a bool or a sequence of nn.Module classes, got {bad!r}")
    return types


def optimize_for_tensor_cores(
    model: nn.Module,
    dtype: torch.dtype = torch.float16,
    *,
    keep_fp32: bool | Sequence[type[nn.Module]] = False,
    cast_inputs: bool = True,
    device: int | str | torch.device | None = None,
    strict: bool = False,
) -> nn.Module:
    """Prepare ``model`` for Tensor Core inference, in place, and return it in eval mode.

    On a GPU with Tensor Cores (default: the current one): moves the model there, casts its floating parameters
    and buffers to ``dtype`` (bf16 on a GPU without it, such as a T4, warns and uses fp16; ``strict=True``
    raises instead) and sets ``torch.backends.cudnn.benchmark = True`` (process-wide, not restored).
    ``keep_fp32=True`` keeps :data:`PRECISION_SENSITIVE` modules in fp32 (or pass the module classes to keep),
    with hooks that cast at their boundaries. ``cast_inputs=True`` adds a pre-hook on ``model`` casting its
    floating inputs to the compute dtype, so fp32 inputs keep working; integer inputs are left alone.

    Without a GPU: returns a working CPU model (bf16 where the CPU supports it) with a
    :class:`~llamatelemetry_tensorcore.config.TensorCoreWarning`. On a GPU older than Volta: moved, dtype kept,
    with the same warning. Raises ``TypeError`` when ``model`` is not an ``nn.Module`` and
    :class:`~llamatelemetry_core.errors.ConfigurationError` for an unsupported ``dtype``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected model to be a torch.nn.Module, got {type(model).__name__}")
    keep = _keep_types(keep_fp32)
    target, info = runtime_device(device)
    plan = plan_model(info, dtype, strict=strict)
    if plan.warning is not None:
        warnings.warn(plan.warning, TensorCoreWarning, stacklevel=2)
    model.to(target)
    kept: list[str] = []
    compute = plan.compute_dtype
    if compute is not None:
        for module in model.modules():  # a second call replaces the hooks of the first
            if hasattr(module, _HOOKS_ATTR):
                _set_hooks(module, [])
        _cast_tree(model, compute, keep, False, kept, "")
        root_kept = bool(keep) and isinstance(model, keep)
        if cast_inputs and not root_kept:
            _set_hooks(model, [model.register_forward_pre_hook(_CastInputs(compute), with_kwargs=True)])
    if plan.cudnn_benchmark:
        set_flags(cudnn_benchmark=True)
    model.eval()
    logger.info(
        "optimize_for_tensor_cores: %s on %s in %s; kept in fp32: %s",
        type(model).__name__,
        info.name,
        "its own dtype" if compute is None else dtype_name(compute),
        ", ".join(kept) or "nothing",
    )
    return model
