"""What software is present and whether it can run here: Triton, flash-attn, PyTorch's SDPA backends.

These answers are shared by the components' dispatch rules and by ``llamatelemetry doctor``. "Installed"
means the package imports; "usable" means it can do work on this device, checked by running something where
that is cheap (a tiny Triton kernel, a tiny SDPA call per backend), never assumed from a version number.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.toolchain import TRITON_INSTALL

__all__ = [
    "PDL_ENV",
    "SDPA_NOT_PROBED",
    "TRITON_INTERPRET_ENV",
    "PackageStatus",
    "distribution_version",
    "flash_attn_status",
    "pdl_capable",
    "programmatic_launch",
    "reload_launch_env",
    "sdpa_backend_status",
    "tf32_matmul_enabled",
    "triton_devices",
    "triton_interpreter_enabled",
    "triton_status",
]

TRITON_INTERPRET_ENV = "TRITON_INTERPRET"
PDL_ENV = "LLAMATELEMETRY_PDL"
"""Set to ``0`` (or ``false``, ``off``, ``no``) to launch every Triton kernel without programmatic dependent launch
(see :func:`programmatic_launch`)."""
_PDL_MIN_CAPABILITY = (9, 0)
_OFF = {"0", "false", "off", "no"}
SDPA_NOT_PROBED = "not probed (simulated)"
"""What :func:`sdpa_backend_status` says of every backend on a simulated device, where nothing can run."""
_FLASH_ATTN_MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class PackageStatus:
    """Whether an optional package is installed and can run on a device (``reason`` says why not)."""

    name: str
    installed: bool
    version: str | None
    usable: bool
    reason: str | None


def distribution_version(distribution: str) -> str | None:
    """The installed version of a distribution, or ``None`` when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors, slowly, in Python."""
    return os.environ.get(TRITON_INTERPRET_ENV, "").strip().lower() in {"1", "true", "on", "yes"}


def pdl_capable(device: DeviceInfo) -> bool:
    """Whether ``device`` has grid dependency control (compute capability 9.0 on): the kernels' ahead-of-time
    builds for it are compiled as :func:`programmatic_launch` launches them there."""
    return device.compute_capability is not None and device.compute_capability >= _PDL_MIN_CAPABILITY


@functools.cache
def _pdl_capable_index(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= _PDL_MIN_CAPABILITY


def programmatic_launch(t: torch.Tensor) -> bool:
    """Whether the kernels that take ``t`` launch with programmatic dependent launch (PDL): on CUDA tensors of a
    GPU of compute capability 9.0 or newer (Hopper on), outside Triton's interpreter, unless ``PDL_ENV`` is off.

    A kernel launched so may start while the kernel before it in the stream finishes; it waits for that kernel's
    completion (``griddepcontrol.wait``) before it reads anything, and lets the next kernel start once its main
    loop is done. Inside a CUDA graph this overlaps each launch with the tail of the kernel before it. The
    variables are read at the first launch and again after :func:`reload_launch_env` (which
    :func:`~llamatelemetry_core.selection.reset_selection_cache` calls); a CUDA graph keeps the launches it
    captured.
    """
    if not t.is_cuda:
        return False
    allowed = _launch_env[0]
    if allowed is None:
        allowed = not triton_interpreter_enabled() and os.environ.get(PDL_ENV, "").strip().lower() not in _OFF
        _launch_env[0] = allowed
    return allowed and _pdl_capable_index(t.get_device())


_launch_env: list[bool | None] = [None]  # PDL allowed by TRITON_INTERPRET and PDL_ENV, read once


def reload_launch_env() -> None:
    """Read ``PDL_ENV`` and ``TRITON_INTERPRET`` again at the next :func:`programmatic_launch`."""
    _launch_env[0] = None


@functools.cache
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return str(exc)
    return None


def _triton_missing_reason(info: DeviceInfo) -> str:
    """What a missing Triton means on ``info``: advice to install it only where its kernels would run."""
    if info.kind == "cpu" and not triton_interpreter_enabled():
        return (
            "not needed on a CPU: every operation runs its PyTorch reference (Triton runs CPU tensors only in its "
            f"interpreter, {TRITON_INTERPRET_ENV}=1, which is for tests)"
        )
    return f"install it with: {TRITON_INSTALL}"


def triton_devices() -> frozenset[str]:
    """Device kinds Triton kernels can run on in this process: ``cuda``, plus ``cpu`` under the interpreter.

    Used as the ``devices`` of every Triton implementation, so that a CPU tensor takes the reference path
    unless the interpreter is on.
    """
    return frozenset({"cuda", "cpu"}) if triton_interpreter_enabled() else frozenset({"cuda"})


def _probe_triton_on(device: torch.device) -> str | None:
    from llamatelemetry_core._triton_probe import run_probe

    try:
        run_probe(device)
    except Exception as exc:  # any failure to compile or launch means "not usable"; the reason is reported
        return f"a probe kernel failed on {device}: {type(exc).__name__}: {exc}"
    return None


def triton_status(device: DeviceInfo | None = None, *, probe: bool = True) -> PackageStatus:
    """Is Triton installed, and can it run kernels on ``device`` (the current device by default)?

    With ``probe=True`` a tiny kernel is compiled and run on the real device (or in the interpreter on CPU).
    On a simulated device nothing can be run, so usability is judged from the device facts alone.
    """
    info = device if device is not None else get_device_info()
    if _triton_import_error() is not None:
        return PackageStatus("triton", False, None, False, _triton_missing_reason(info))
    version = distribution_version("triton") or getattr(importlib.import_module("triton"), "__version__", None)
    if info.kind == "cpu" and not triton_interpreter_enabled():
        return PackageStatus(
            "triton",
            True,
            version,
            False,
            f"no CUDA device; Triton kernels run on CPU only in the interpreter ({TRITON_INTERPRET_ENV}=1)",
        )
    if info.simulated or not probe:
        return PackageStatus("triton", True, version, True, None)
    target = torch.device("cpu") if info.kind == "cpu" else torch.device("cuda", info.index or 0)
    reason = _probe_triton_on(target)
    return PackageStatus("triton", True, version, reason is None, reason)


def _flash_attn_unusable_on(info: DeviceInfo) -> str | None:
    if not info.is_cuda:
        return "flash-attn runs on CUDA GPUs only (Ampere, compute capability 8.0, and newer)"
    if not info.capability_at_least(*_FLASH_ATTN_MIN_CAPABILITY):
        major, minor = _FLASH_ATTN_MIN_CAPABILITY
        cc = info.compute_capability
        got = "unknown" if cc is None else f"{cc[0]}.{cc[1]}"
        return f"flash-attn 2 needs compute capability >= {major}.{minor}; {info.name} is {info.architecture} ({got})"
    return None


def flash_attn_status(device: DeviceInfo | None = None) -> PackageStatus:
    """Is the flash-attn package installed, and can it run on ``device``? (It needs an Ampere or newer GPU.)

    Where it cannot run (a CPU, a T4), the reason says so and gives no advice to install it.
    """
    info = device if device is not None else get_device_info()
    unusable = _flash_attn_unusable_on(info)
    if importlib.util.find_spec("flash_attn") is None:
        reason = unusable or "install it with: pip install flash-attn --no-build-isolation"
        return PackageStatus("flash-attn", False, None, False, reason)
    try:
        module = importlib.import_module("flash_attn")
    except Exception as exc:  # a broken CUDA extension raises ImportError, OSError or RuntimeError on import
        return PackageStatus(
            "flash-attn", True, distribution_version("flash-attn"), False, f"flash-attn fails to import: {exc}"
        )
    version = getattr(module, "__version__", None) or distribution_version("flash-attn")
    return PackageStatus("flash-attn", True, version, unusable is None, unusable)


def tf32_matmul_enabled() -> bool:
    """Whether fp32 cuBLAS matmuls may use TF32 Tensor Cores now, under either of PyTorch's two APIs.

    From torch 2.9 the ``fp32_precision`` strings sit beside the boolean ``allow_tf32``; reading the boolean
    after the strings were used can raise, so the strings are read first where they exist.
    """
    matmul = torch.backends.cuda.matmul
    precision = str(getattr(matmul, "fp32_precision", "none"))
    if precision != "none":
        return precision == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # a mix of the two APIs that the legacy view cannot express
        try:
            return bool(matmul.allow_tf32)
        except RuntimeError:
            return False


def _sdpa_backends() -> dict[str, SDPBackend]:
    names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
    return {name: getattr(SDPBackend, attr) for name, attr in names.items() if hasattr(SDPBackend, attr)}


def sdpa_backend_status(device: DeviceInfo | None = None) -> dict[str, str | None]:
    """Which of PyTorch's SDPA backends run here: name -> ``None`` when it runs, else the reason.

    Each backend is tried on a tiny causal fp16 call (fp32 on CPU) with only that backend allowed. On a
    simulated device nothing can run, and every entry says :data:`SDPA_NOT_PROBED`.
    """
    info = device if device is not None else get_device_info()
    backends = _sdpa_backends()
    if info.simulated:
        return dict.fromkeys(backends, SDPA_NOT_PROBED)
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    dev = torch.device("cuda", info.index or 0) if info.is_cuda else torch.device("cpu")
    dtype = torch.float16 if info.is_cuda else torch.float32
    q = torch.randn(1, 2, 16, 64, device=dev, dtype=dtype)
    result: dict[str, str | None] = {}
    for name, backend in backends.items():
        try:
            with sdpa_kernel(backend):
                scaled_dot_product_attention(q, q, q, is_causal=True)
            result[name] = None
        except RuntimeError as exc:
            result[name] = str(exc).splitlines()[0][:200] or type(exc).__name__
    return result
