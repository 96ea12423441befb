"""Turning Tensor Cores on: which switches apply to a device, and a record of what was really set.

What each NVIDIA generation's Tensor Cores take (inputs; accumulation is fp32 for the floating types):

============  ======  ===========  ====================================
generation    sm      fp16/bf16    TF32 for fp32 matmuls
============  ======  ===========  ====================================
Volta         7.0     fp16         no
Turing        7.5     fp16         no
Ampere        8.0-8.7 fp16, bf16   yes
Ada           8.9     fp16, bf16   yes
Hopper        9.0     fp16, bf16   yes
Blackwell     10, 12  fp16, bf16   yes
============  ======  ===========  ====================================

:func:`plan_tensor_cores` turns a :class:`~llamatelemetry_core.device.DeviceInfo` (real or simulated) into the
switches to set; :func:`enable_tensor_cores` sets them and returns a :class:`TensorCoreConfig` that records the
values read back afterwards and, used as a context manager, restores the previous process-wide state on exit.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType

import torch

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_core.validation import dtype_name
from llamatelemetry_tensorcore._flags import BackendFlags, restore_flags, set_flags, snapshot_flags

__all__ = [
    "TensorCoreConfig",
    "TensorCorePlan",
    "TensorCoreWarning",
    "enable_tensor_cores",
    "plan_tensor_cores",
    "resolve_compute_dtype",
]

logger = logging.getLogger(__name__)

REDUCED_DTYPES = (torch.float16, torch.bfloat16)


class TensorCoreWarning(UserWarning):
    """A request was adapted to what the device can do (bf16 on a GPU without it, no GPU at all)."""


def _capability(info: DeviceInfo) -> str:
    cc = info.compute_capability
    return "no compute capability (CPU)" if cc is None else f"compute capability {cc[0]}.{cc[1]} ({info.architecture})"


def resolve_compute_dtype(
    info: DeviceInfo, dtype: torch.dtype, *, strict: bool = False, allowed: tuple[torch.dtype, ...] = REDUCED_DTYPES
) -> torch.dtype:
    """The dtype to compute in on ``info`` when ``dtype`` is asked for.

    bf16 on a CUDA device without native bf16 (Volta, Turing: a T4) becomes fp16 with a
    :class:`TensorCoreWarning`, or raises :class:`~llamatelemetry_core.errors.CapabilityError` when ``strict``.
    A dtype outside ``allowed`` raises :class:`~llamatelemetry_core.errors.ConfigurationError`.
    """
    if dtype not in allowed:
        names = ", ".join(f"torch.{dtype_name(d)}" for d in allowed)
        raise ConfigurationError(f"expected dtype to be one of {names}, got {dtype!r}")
    if dtype == torch.bfloat16 and info.is_cuda and not info.supports_bf16:
        reason = f"bfloat16 Tensor Cores need compute capability >= 8.0 (Ampere); {info.name} has {_capability(info)}"
        if strict:
            raise CapabilityError(f"{reason}; pass dtype=torch.float16, or strict=False to fall back to float16")
        warnings.warn(
            f"{reason}, so float16 is used instead; pass dtype=torch.float16 to silence this, strict=True to raise",
            TensorCoreWarning,
            stacklevel=3,
        )
        return torch.float16
    return dtype


@dataclass(frozen=True)
class TensorCorePlan:
    """The switches :func:`enable_tensor_cores` would set on one device.

    A switch that is ``None`` is left alone: it does not apply to this device (TF32 before Ampere) or was not
    asked for. ``tf32_applies`` says whether the GPU has TF32 at all.
    """

    device: str
    kind: str
    architecture: str
    compute_capability: tuple[int, int] | None
    tensor_cores: bool
    requested_dtype: torch.dtype
    compute_dtype: torch.dtype
    tf32_applies: bool
    tf32: bool | None
    cudnn_benchmark: bool | None
    fp16_reduced_precision_reduction: bool | None
    bf16_reduced_precision_reduction: bool | None
    notes: tuple[str, ...] = ()

    def switches(self) -> dict[str, bool]:
        """The switches this plan sets, by name, with their values."""
        values = {
            "tf32": self.tf32,
            "cudnn_benchmark": self.cudnn_benchmark,
            "fp16_reduced_precision_reduction": self.fp16_reduced_precision_reduction,
            "bf16_reduced_precision_reduction": self.bf16_reduced_precision_reduction,
        }
        return {name: value for name, value in values.items() if value is not None}


def plan_tensor_cores(
    info: DeviceInfo,
    dtype: torch.dtype = torch.float16,
    allow_tf32: bool = True,
    *,
    cudnn_benchmark: bool = True,
    reduced_precision_reduction: bool = True,
    strict: bool = False,
) -> TensorCorePlan:
    """What enabling Tensor Cores means on ``info`` (pure: reads and sets nothing).

    ``dtype`` is the dtype the work will run in: float16, bfloat16, or float32 (which reaches Tensor Cores only
    through TF32). ``reduced_precision_reduction`` is the cuBLAS switch that lets fp16/bf16 GEMMs reduce split-K
    partial sums in that dtype (faster, slightly less accurate); it is set for ``dtype`` only. The three
    switches must be ``True`` or ``False``: anything else raises :class:`ConfigurationError`.
    """
    for name, value in (
        ("allow_tf32", allow_tf32),
        ("cudnn_benchmark", cudnn_benchmark),
        ("reduced_precision_reduction", reduced_precision_reduction),
        ("strict", strict),
    ):
        if not isinstance(value, bool):
            raise ConfigurationError(f"expected {name} to be True or False, got {value!r}")
    compute = resolve_compute_dtype(info, dtype, strict=strict, allowed=(*REDUCED_DTYPES, torch.float32))
    notes: list[str] = []
    nothing = TensorCorePlan(
        device=info.name,
        kind=info.kind,
        architecture=info.architecture,
        compute_capability=info.compute_capability,
        tensor_cores=False,
        requested_dtype=dtype,
        compute_dtype=compute,
        tf32_applies=False,
        tf32=None,
        cudnn_benchmark=None,
        fp16_reduced_precision_reduction=None,
        bf16_reduced_precision_reduction=None,
    )
    if not info.is_cuda:
        return replace(nothing, notes=("no CUDA device: no Tensor Core switch applies, nothing is changed",))
    if compute != dtype:
        notes.append(f"{dtype_name(dtype)} is not native on {info.name}: {dtype_name(compute)} is used")
    if not info.has_tensor_cores:
        notes.append(f"{info.name} has no Tensor Cores ({_capability(info)} < 7.0): only cuDNN benchmark applies")
        return replace(nothing, cudnn_benchmark=cudnn_benchmark, notes=tuple(notes))
    if not info.supports_tf32:
        notes.append(
            f"TF32 does not apply: it needs compute capability >= 8.0 (Ampere), {info.name} has {_capability(info)}; "
            "fp32 matmuls stay on CUDA cores, use float16 for Tensor Cores"
        )
    elif compute == torch.float32 and not allow_tf32:
        notes.append("float32 with allow_tf32=False: fp32 matmuls will not use Tensor Cores")
    return replace(
        nothing,
        tensor_cores=True,
        tf32_applies=info.supports_tf32,
        tf32=allow_tf32 if info.supports_tf32 else None,
        cudnn_benchmark=cudnn_benchmark,
        fp16_reduced_precision_reduction=reduced_precision_reduction if compute == torch.float16 else None,
        bf16_reduced_precision_reduction=reduced_precision_reduction if compute == torch.bfloat16 else None,
        notes=tuple(notes),
    )


_READ_BACK: dict[str, Callable[[BackendFlags], bool | None]] = {
    "tf32": lambda f: f.matmul_tf32,
    "cudnn_benchmark": lambda f: f.cudnn_benchmark,
    "fp16_reduced_precision_reduction": lambda f: f.fp16_reduced_precision_reduction,
    "bf16_reduced_precision_reduction": lambda f: f.bf16_reduced_precision_reduction,
}


@dataclass
class TensorCoreConfig:
    """What :func:`enable_tensor_cores` did: the plan, the switches as read back after setting them, and the
    state before (``previous``).

    Usable as a context manager: the switches are set when :func:`enable_tensor_cores` is called and the
    previous state comes back on exit (or on :meth:`restore`), nested blocks included.
    """

    plan: TensorCorePlan
    applied: Mapping[str, bool | None]
    previous: BackendFlags
    _restored: bool = field(default=False, repr=False, compare=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype Tensor Cores will compute in (bf16 may have become fp16)."""
        return self.plan.compute_dtype

    @property
    def tensor_cores(self) -> bool:
        return self.plan.tensor_cores

    @property
    def tf32_applies(self) -> bool:
        return self.plan.tf32_applies

    @property
    def tf32_enabled(self) -> bool | None:
        """TF32 as read back after setting it; ``None`` where TF32 does not apply (it was not touched)."""
        return self.applied.get("tf32")

    @property
    def cudnn_benchmark(self) -> bool | None:
        return self.applied.get("cudnn_benchmark")

    @property
    def notes(self) -> tuple[str, ...]:
        return self.plan.notes

    def restore(self) -> None:
        """Put the switches back as they were before :func:`enable_tensor_cores` (once; later calls do nothing)."""
        if not self._restored:
            restore_flags(self.previous)
            self._restored = True

    def __enter__(self) -> TensorCoreConfig:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()


def enable_tensor_cores(
    dtype: torch.dtype = torch.float16,
    allow_tf32: bool = True,
    *,
    device: int | str | torch.device | None = None,
    cudnn_benchmark: bool = True,
    reduced_precision_reduction: bool = True,
    strict: bool = False,
) -> TensorCoreConfig:
    """Set the process-wide switches that route work to Tensor Cores on ``device`` (default: the current GPU).

    TF32 (cuBLAS and cuDNN) is set to ``allow_tf32`` from Ampere on and left alone before; cuDNN benchmark mode
    to ``cudnn_benchmark``; the reduced-precision reduction switch of ``dtype`` to ``reduced_precision_reduction``.
    Without a CUDA device nothing is changed (logged). bf16 on a GPU without native bf16 warns and plans fp16
    (raises :class:`~llamatelemetry_core.errors.CapabilityError` when ``strict``).

    Returns a :class:`TensorCoreConfig`; ``with enable_tensor_cores(...):`` restores the previous state on exit.
    """
    info = get_device_info(device)
    plan = plan_tensor_cores(
        info,
        dtype,
        allow_tf32,
        cudnn_benchmark=cudnn_benchmark,
        reduced_precision_reduction=reduced_precision_reduction,
        strict=strict,
    )
    previous = snapshot_flags()
    switches = plan.switches()
    set_flags(**switches)
    after = snapshot_flags()
    applied = {name: _READ_BACK[name](after) for name in switches}
    if not info.is_cuda:
        logger.warning("enable_tensor_cores: %s", "; ".join(plan.notes))
    else:
        logger.info("enable_tensor_cores on %s: set %s%s", info.name, applied, "".join(f"; {n}" for n in plan.notes))
    return TensorCoreConfig(plan=plan, applied=applied, previous=previous)
