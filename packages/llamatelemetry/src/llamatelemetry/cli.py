"""The ``llamatelemetry`` command line: ``doctor`` reports what this machine can run, and how.

``llamatelemetry doctor`` (or ``python -m llamatelemetry doctor``) prints the GPU and its capability, Tensor
Core and TF32/bf16/fp8 support, Triton and flash-attn (installed? usable here?), which of PyTorch's SDPA backends
run, which implementation each registered operation would use here, and the installed components. ``--json``
prints the same as one JSON object; ``--simulate t4`` answers as if that GPU were present (nothing is probed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from llamatelemetry import _engine_cli
from llamatelemetry.__about__ import __version__
from llamatelemetry._components import COMPONENTS, import_component
from llamatelemetry_core.device import get_device_info, simulate_device, simulated_device_key
from llamatelemetry_core.environment import (
    distribution_version,
    flash_attn_status,
    sdpa_backend_status,
    tf32_matmul_enabled,
    triton_status,
)
from llamatelemetry_core.errors import LlamaTelemetryError
from llamatelemetry_core.selection import CallSpec, operations

__all__ = ["doctor_report", "main"]


def _components() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {
        "llamatelemetry-core": {"version": distribution_version("llamatelemetry-core"), "imports": True},
    }
    for extra, component in COMPONENTS.items():
        entry: dict[str, Any] = {
            "version": distribution_version(component.distribution),
            "extra": extra,
            "path": component.documented_path,
        }
        try:
            import_component(extra)
            entry["imports"] = True
        except ImportError as exc:
            entry["imports"] = False
            entry["reason"] = str(exc)
        result[component.distribution] = entry
    return result


def _cudnn_version() -> int | None:
    if not torch.backends.cudnn.is_available():  # type: ignore[no-untyped-call]
        return None
    version: int | None = torch.backends.cudnn.version()  # type: ignore[no-untyped-call]
    return version


def doctor_report() -> dict[str, Any]:
    """Everything ``doctor`` reports, as plain data (what ``--json`` prints)."""
    components = _components()  # imports the installed components, which registers their operations
    info = get_device_info()
    call = CallSpec.for_device(info)
    ops: dict[str, Any] = {}
    for name, op in sorted(operations().items()):
        candidates = op.explain(call)
        try:
            selected = op.select(call).name
        except LlamaTelemetryError as exc:
            selected = f"error: {exc}"
        ops[name] = {
            "selected": selected,
            "dtype": str(call.dtype).removeprefix("torch."),
            "candidates": [asdict(c) for c in candidates],
        }
    return {
        "llamatelemetry": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": _cudnn_version(),
            "cuda_available": torch.cuda.is_available(),
        },
        "simulated_device": simulated_device_key(),
        "device": info.to_dict(),
        "tensor_cores": {
            "present": info.has_tensor_cores,
            "tf32": info.supports_tf32,
            "bf16": info.supports_bf16,
            "fp8": info.supports_fp8,
            "tf32_matmul_enabled": tf32_matmul_enabled(),
        },
        "triton": asdict(triton_status(info)),
        "flash_attn": asdict(flash_attn_status(info)),
        "sdpa_backends": sdpa_backend_status(info),
        "operations": ops,
        "components": components,
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _status_line(status: dict[str, Any]) -> str:
    if not status["installed"]:
        return f"not installed ({status['reason']})"
    usable = "usable" if status["usable"] else f"not usable: {status['reason']}"
    return f"{status['version']}, {usable}"


def _print_human(report: dict[str, Any]) -> None:
    dev = report["device"]
    tc = report["tensor_cores"]
    gib = 1024**3
    lines = [f"llamatelemetry {report['llamatelemetry']} on Python {report['python']}, {report['platform']}"]
    t = report["torch"]
    lines.append(
        f"torch {t['version']} (CUDA {t['cuda']}, cuDNN {t['cudnn']}, CUDA available: {_yes(t['cuda_available'])})"
    )
    if report["simulated_device"]:
        lines.append(f"SIMULATED device: {report['simulated_device']} (nothing below was run on it)")
    if dev["kind"] == "cuda":
        lines.append(
            f"GPU {dev['index']}: {dev['name']}, compute capability {dev['compute_capability']} "
            f"({dev['architecture']}), {dev['sm_count']} SMs, {dev['total_memory_bytes'] / gib:.1f} GiB, "
            f"{(dev['shared_memory_per_block_bytes'] or 0) // 1024} KiB shared memory per block"
        )
        peak = dev["peak"]
        if peak:
            lines.append(
                f"  datasheet: fp16 {peak['fp16_tflops']} TFLOP/s, bf16 {peak['bf16_tflops']}, tf32 "
                f"{peak['tf32_tflops']}, fp32 {peak['fp32_tflops']}, int8 {peak['int8_tops']} TOP/s, "
                f"{peak['memory_bandwidth_gbps']} GB/s"
            )
    else:
        lines.append(f"no CUDA GPU: running on CPU ({dev['name']}, {dev['sm_count']} cores)")
    lines.append(
        f"Tensor Cores: {_yes(tc['present'])}; TF32: {_yes(tc['tf32'])} (matmul TF32 enabled: "
        f"{_yes(tc['tf32_matmul_enabled'])}); bf16: {_yes(tc['bf16'])}; fp8: {_yes(tc['fp8'])}"
    )
    lines.append(f"Triton: {_status_line(report['triton'])}")
    lines.append(f"flash-attn: {_status_line(report['flash_attn'])}")
    sdpa = ", ".join(f"{k} {'yes' if v is None else 'no'}" for k, v in report["sdpa_backends"].items())
    lines.append(f"SDPA backends: {sdpa}")
    lines.append("operations (implementation chosen here for a typical call):")
    if not report["operations"]:
        lines.append("  none registered by the installed components")
    for name, op in report["operations"].items():
        lines.append(f"  {name} [{op['dtype']}]: {op['selected']}")
        for cand in op["candidates"]:
            if cand["reason"] is not None:
                lines.append(f"      not {cand['name']}: {cand['reason']}")
    lines.append("components:")
    for dist, comp in report["components"].items():
        state = comp["version"] if comp["imports"] else f"not installed ({comp.get('extra', '')})"
        where = f" -> {comp['path']}" if "path" in comp else ""
        lines.append(f"  {dist}: {state}{where}")
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llamatelemetry", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"llamatelemetry {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser("doctor", help="report what this machine can run, and which implementation each op uses")
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.add_argument("--simulate", metavar="GPU", help="answer as if this GPU were present (t4, a100, h100, ...)")
    _engine_cli.register(sub)
    args = parser.parse_args(argv)
    if args.command in _engine_cli.ENGINE_COMMANDS:
        return _engine_cli.run(args)
    try:
        if args.simulate:
            with simulate_device(args.simulate):
                report = doctor_report()
        else:
            report = doctor_report()
    except LlamaTelemetryError as exc:
        print(f"llamatelemetry doctor: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_human(report)
    return 0
