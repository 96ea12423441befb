"""Does this device have Tensor Cores, what do they take, and how much faster are they?

Facts come from :func:`llamatelemetry_core.get_device_info` (so a simulated T4 answers like a T4 anywhere) and
throughput from its datasheet table (per GPU model: a T4 and an RTX 2080 are both Turing but differ). The
estimated speedup is the datasheet ratio of Tensor Core fp16 (fp32 accumulation) to CUDA-core fp32 throughput;
``measure=True`` times real fp16 and fp32 matmuls on the device and reports the measured ratio beside it.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable
from typing import Any

import torch

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.errors import CapabilityError
from llamatelemetry_core.validation import check_positive_int
from llamatelemetry_tensorcore._flags import tf32_disabled

__all__ = [
    "check_tensor_core_support",
    "estimated_speedup",
    "get_tensor_core_info",
    "measure_matmul_speedup",
    "tensor_core_dtypes",
    "unsupported_reason",
]

logger = logging.getLogger(__name__)


def unsupported_reason(info: DeviceInfo) -> str | None:
    """Why ``info`` has no Tensor Cores (``None`` when it has them)."""
    if info.has_tensor_cores:
        return None
    if not info.is_cuda:
        return f"no CUDA device: {info.name} is a CPU, Tensor Cores are NVIDIA GPU units (Volta, sm 7.0, and newer)"
    cc = info.compute_capability
    got = "unknown" if cc is None else f"{cc[0]}.{cc[1]} ({info.architecture})"
    return f"{info.name} has compute capability {got}; Tensor Cores start with Volta (7.0)"


def check_tensor_core_support(device: int | str | torch.device | None = None) -> bool:
    """True when ``device`` (default: the current GPU, or the CPU without one) has Tensor Cores. Never prints."""
    info = get_device_info(device)
    reason = unsupported_reason(info)
    if reason is not None:
        logger.debug("no Tensor Cores: %s", reason)
    return reason is None


def tensor_core_dtypes(info: DeviceInfo) -> list[str]:
    """Input dtypes ``info``'s Tensor Cores multiply, as torch dtype names (``"tfloat32"`` for TF32).

    Volta: fp16. Turing adds int8 (as does Volta's Xavier, sm 7.2). Ampere adds bf16 and TF32; Ada and newer fp8.
    """
    if not info.has_tensor_cores:
        return []
    dtypes = ["float16"]
    if info.supports_bf16:
        dtypes.append("bfloat16")
    if info.supports_tf32:
        dtypes.append("tfloat32")
    if info.capability_at_least(7, 2):
        dtypes.append("int8")
    if info.supports_fp8:
        dtypes.extend(["float8_e4m3fn", "float8_e5m2"])
    return dtypes


def estimated_speedup(info: DeviceInfo) -> float | None:
    """Datasheet Tensor Core fp16 / CUDA-core fp32 throughput of ``info``'s model.

    1.0 without Tensor Cores; ``None`` for a GPU model missing from the datasheet table (measure it instead).
    """
    if not info.has_tensor_cores:
        return 1.0
    peak = info.peak
    if peak is None or peak.fp16_tflops is None or peak.fp32_tflops <= 0:
        return None
    return round(peak.fp16_tflops / peak.fp32_tflops, 2)


def get_tensor_core_info(device: int | str | torch.device | None = None, *, measure: bool = False) -> dict[str, Any]:
    """Tensor Core facts of ``device`` (default: the current GPU, or the CPU without one) as a plain dict.

    Keys: ``supported``, ``device``, ``kind``, ``simulated``, ``compute_capability`` (``"7.5"``),
    ``architecture``, ``sm_count``, the datasheet figures of that GPU model ``fp16_tflops``, ``bf16_tflops``,
    ``tf32_tflops``, ``fp32_tflops``, ``int8_tops``, ``fp8_tflops``, ``memory_bandwidth_gbps`` (``None`` when
    not applicable or unknown) and ``peak_source``, ``supported_dtypes``, ``estimated_speedup`` (see
    :func:`estimated_speedup`), and ``reason`` when unsupported. ``measure=True`` adds ``measured_speedup`` and
    the measured TFLOP/s (see :func:`measure_matmul_speedup`); it needs a real CUDA device.
    """
    info = get_device_info(device)
    peak = info.peak
    cc = info.compute_capability
    result: dict[str, Any] = {
        "supported": info.has_tensor_cores,
        "device": info.name,
        "kind": info.kind,
        "simulated": info.simulated,
        "compute_capability": None if cc is None else f"{cc[0]}.{cc[1]}",
        "architecture": info.architecture,
        "sm_count": info.sm_count,
        "fp16_tflops": None if peak is None else peak.fp16_tflops,
        "bf16_tflops": None if peak is None else peak.bf16_tflops,
        "tf32_tflops": None if peak is None else peak.tf32_tflops,
        "fp32_tflops": None if peak is None else peak.fp32_tflops,
        "int8_tops": None if peak is None else peak.int8_tops,
        "fp8_tflops": None if peak is None else peak.fp8_tflops,
        "memory_bandwidth_gbps": None if peak is None else peak.memory_bandwidth_gbps,
        "peak_source": None if peak is None else peak.source,
        "supported_dtypes": tensor_core_dtypes(info),
        "estimated_speedup": estimated_speedup(info),
    }
    reason = unsupported_reason(info)
    if reason is not None:
        result["reason"] = reason
    elif peak is None:
        result["note"] = f"{info.name} is not in the datasheet table: pass measure=True for a measured speedup"
    if measure:
        result.update(measure_matmul_speedup(device))
    return result


def _median_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median time of ``fn`` in milliseconds over ``repeats`` calls, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(float(start.elapsed_time(end)))
    return float(statistics.median(times))


def measure_matmul_speedup(
    device: int | str | torch.device | None = None, *, size: int = 4096, warmup: int = 3, repeats: int = 10
) -> dict[str, Any]:
    """Time an fp16 and an fp32 (TF32 off) ``size``-cube matmul on the real CUDA ``device``.

    Returns ``measured_speedup`` (fp32 time / fp16 time), ``measured_fp16_tflops``, ``measured_fp32_tflops``
    and ``measured_size``. Raises :class:`~llamatelemetry_core.errors.CapabilityError` on a CPU or a simulated
    device (nothing can be timed there).
    """
    check_positive_int(size, "size")
    check_positive_int(repeats, "repeats")
    info = get_device_info(device)
    if not info.is_cuda or info.simulated:
        what = "a CPU" if not info.is_cuda else "a simulated device"
        raise CapabilityError(
            f"measuring Tensor Core speed needs a real CUDA device, got {what} ({info.name}); "
            "use measure=False, or run on a GPU machine without LLAMATELEMETRY_SIMULATE_DEVICE"
        )
    dev = torch.device("cuda", torch.cuda.current_device() if info.index is None else info.index)
    gen = torch.Generator(device=dev).manual_seed(0)
    a32 = torch.randn(size, size, device=dev, generator=gen)
    b32 = torch.randn(size, size, device=dev, generator=gen)
    a16, b16 = a32.half(), b32.half()
    with tf32_disabled():
        fp32_ms = _median_ms(lambda: torch.matmul(a32, b32), warmup, repeats)
    fp16_ms = _median_ms(lambda: torch.matmul(a16, b16), warmup, repeats)
    flop = 2.0 * size**3
    measured = {
        "measured_size": size,
        "measured_fp16_tflops": round(flop / (fp16_ms * 1e-3) / 1e12, 2),
        "measured_fp32_tflops": round(flop / (fp32_ms * 1e-3) / 1e12, 2),
        "measured_speedup": round(fp32_ms / fp16_ms, 2),
    }
    logger.info("measured on %s: %s", info.name, measured)
    return measured
