"""The llamatelemetry command line: doctor reports what this machine can run, and how, and what it buys.

``llamatelemetry doctor`` (or ``python -m llamatelemetry doctor``) prints the GPUs and their capability, the
driver, Tensor Core and TF32/bf16/fp8 support, Triton and flash-attn (installed? usable here?), which of
PyTorch's SDPA backends run, which implementation each registered operation would use here with the ratio
measured against PyTorch on this GPU model, the installed components, the environment variables that change
what runs, and installed versions outside the ranges the distributions declare. ``--json`` prints the same as
one JSON object (``schema_version`` says its layout); ``--simulate t4`` answers as if that device were present
(nothing is probed on it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

import llamatelemetry_core
from llamatelemetry import _engine_cli
from llamatelemetry.__about__ import __version__
from llamatelemetry._components import COMPONENTS, import_component
from llamatelemetry._environment import (
    driver_versions,
    environment_variables,
    measured_results,
    outside_tested_ranges,
    package_versions,
    visible_gpus,
)
from llamatelemetry_core.device import DeviceInfo, get_device_info, simulate_device, simulated_device_key
from llamatelemetry_core.environment import (
    SDPA_NOT_PROBED,
    distribution_version,
    flash_attn_status,
    sdpa_backend_status,
    tf32_matmul_enabled,
    triton_status,
)
from llamatelemetry_core.errors import LlamaTelemetryError
from llamatelemetry_core.selection import CallSpec, operations

__all__ = ["SCHEMA_VERSION", "doctor_report", "main"]

SCHEMA_VERSION = 3  # 3: operations keyed by namespaced names (triton.rmsnorm, flashattn.attention, ...)
"""Layout of ``doctor --json``: raised when a key changes meaning or disappears (2 added the environment,
every GPU, driver versions, measured ratios, the summary and versions outside the tested ranges)."""
CPU_SUMMARY = "every operation runs its PyTorch reference here; the speedups need a CUDA GPU"
# Implementations that are PyTorch's own code: what an operation runs when no fast path applies.
_PYTORCH_IMPLEMENTATIONS = ("reference", "sdpa_cpu")


def _components() -> dict[str, dict[str, Any]]:
    # The version comes from the distribution's metadata, or from the module itself where there is none (the
    # sources put on the path by hand): a component that imports always has one.
    result: dict[str, dict[str, Any]] = {
        "llamatelemetry-core": {
            "version": distribution_version("llamatelemetry-core") or llamatelemetry_core.__version__,
            "imports": True,
        },
    }
    for extra, component in COMPONENTS.items():
        entry: dict[str, Any] = {
            "version": distribution_version(component.distribution),
            "extra": extra,
            "path": component.documented_path,
            "install": component.install,
        }
        try:
            module = import_component(extra)
            entry["imports"] = True
            if entry["version"] is None:
                entry["version"] = getattr(module, "__version__", None)
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


def _measured(names: tuple[str, ...], selected: str, info: DeviceInfo) -> dict[str, Any] | None:
    """What the benchmarks measured for the operation named ``names`` (its name, then its former names, as the
    results may use) on ``info``'s GPU model (``None``: nothing)."""
    if not info.is_cuda or info.spec_key is None:
        return None
    gpu = measured_results()["gpus"].get(info.spec_key)
    entry = None if gpu is None else next((gpu["operations"][n] for n in names if n in gpu["operations"]), None)
    if gpu is None or entry is None:
        return None
    gpu_time = [c["gpu_time"] for c in entry["cases"] if c["gpu_time"] is not None]
    eager = [c["eager_calls"] for c in entry["cases"] if c["eager_calls"] is not None]
    measured_impl = entry["implementation"]
    return {
        "device": gpu["device"],
        "implementation": measured_impl,
        "applies": measured_impl == "automatic choice" or measured_impl == selected,
        "baseline": entry["baseline"],
        "gpu_time": [min(gpu_time), max(gpu_time)] if gpu_time else None,
        "eager_calls": [min(eager), max(eager)] if eager else None,
        "cases": entry["cases"],
        "source": entry["source"],
    }


def _summary(info: DeviceInfo, ops: dict[str, Any]) -> str:
    fast = {n: op for n, op in ops.items() if op["selected"] not in _PYTORCH_IMPLEMENTATIONS}
    if not info.is_cuda:
        if not fast:
            return CPU_SUMMARY
        chosen = ", ".join(f"{n} ({op['selected']})" for n, op in fast.items())
        interpreter = " (Triton's interpreter: for tests, slower than the references)" if "triton" in chosen else ""
        return (
            f"{chosen} run here{interpreter}; every other operation runs its PyTorch reference; "
            "the speedups need a CUDA GPU"
        )
    measured = [op["measured"] for op in fast.values() if op["measured"] and op["measured"]["applies"]]
    line = f"{len(fast)} of {len(ops)} operations take a fast path on {info.name}"
    if not measured:
        return f"{line}; none was measured on this GPU model, so what they buy here is not known"
    low = min(m["gpu_time"][0] for m in measured if m["gpu_time"])
    high = max(m["gpu_time"][1] for m in measured if m["gpu_time"])
    return (
        f"{line}; {len(measured)} measured on {measured[0]['device']} run at {low:g}x to {high:g}x PyTorch's "
        f"speed (GPU time; below 1x is a loss), {len(fast) - len(measured)} not measured on this GPU"
    )


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
            "measured": _measured((name, *op.aliases), selected, info),
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "llamatelemetry": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {
            "version": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": _cudnn_version(),
            "cuda_available": torch.cuda.is_available(),
        },
        "driver": driver_versions(),
        "packages": package_versions(),
        "environment_variables": environment_variables(),
        "simulated_device": simulated_device_key(),
        "device": info.to_dict(),
        "gpus": visible_gpus(),
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
        "summary": _summary(info, ops),
        "components": components,
        "outside_tested_ranges": outside_tested_ranges(),
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _status_line(status: dict[str, Any]) -> str:
    if not status["installed"]:
        return f"not installed; {status['reason']}"
    usable = "usable" if status["usable"] else f"not usable: {status['reason']}"
    return f"{status['version']}, {usable}"


def _gpu_line(dev: dict[str, Any]) -> str:
    gib = 1024**3
    return (
        f"GPU {dev['index']}: {dev['name']}, compute capability {dev['compute_capability']} "
        f"({dev['architecture']}), {dev['sm_count']} SMs, {dev['total_memory_bytes'] / gib:.1f} GiB, "
        f"{(dev['shared_memory_per_block_bytes'] or 0) // 1024} KiB shared memory per block"
    )


def _datasheet_line(peak: dict[str, Any]) -> str:
    figures = [f"fp16 {peak['fp16_tflops']} TFLOP/s"] if peak["fp16_tflops"] is not None else []
    for key, label in (("bf16_tflops", "bf16"), ("tf32_tflops", "tf32"), ("fp8_tflops", "fp8")):
        if peak[key] is not None:
            figures.append(f"{label} {peak[key]}")
    figures.append(f"fp32 {peak['fp32_tflops']}")
    if peak["int8_tops"] is not None:
        figures.append(f"int8 {peak['int8_tops']} TOP/s")
    return f"  datasheet: {', '.join(figures)}, {peak['memory_bandwidth_gbps']} GB/s"


def _ratio_range(values: list[float] | None) -> str:
    if not values:
        return "-"
    low, high = values
    return f"{low:g}x" if low == high else f"{low:g}-{high:g}x"


def _measured_note(op: dict[str, Any], on_gpu: bool) -> str:
    measured = op["measured"]
    if not on_gpu:
        return ""
    if measured is None:
        return " (not measured on this GPU)"
    if not measured["applies"]:
        return f" (measured for {measured['implementation']}, which is not chosen here)"
    eager = measured["eager_calls"]
    tail = f"; eager calls {_ratio_range(eager)}" if eager else ""
    return (
        f" (measured on {measured['device']}: {_ratio_range(measured['gpu_time'])} the speed of "
        f"{measured['baseline']}, GPU time{tail}; {measured['source']})"
    )


def _device_lines(report: dict[str, Any]) -> list[str]:
    dev = report["device"]
    lines = []
    if report["simulated_device"]:
        lines.append(f"SIMULATED device: {report['simulated_device']} (nothing below was run on it)")
    if dev["kind"] == "cuda":
        lines.append(_gpu_line(dev))
        if dev["peak"]:
            lines.append(_datasheet_line(dev["peak"]))
    else:
        lines.append(f"no CUDA GPU: running on CPU ({dev['name']}, {dev['sm_count']} cores)")
    if report["simulated_device"]:
        others = report["gpus"]
        lines.append("GPUs of this machine: " + ("none" if not others else str(len(others))))
    else:
        others = [g for g in report["gpus"] if g["index"] != dev["index"]]
        if others:
            lines.append("other GPUs of this machine:")
    lines.extend(f"  {_gpu_line(g)}" for g in others)
    return lines


def _torch_build(t: dict[str, Any]) -> str:
    """torch's CUDA and cuDNN builds, in words (a CPU build has neither)."""
    if t["cuda"] is None:
        return "CPU build: no CUDA, no cuDNN"
    return f"CUDA {t['cuda']}, " + (f"cuDNN {t['cudnn']}" if t["cudnn"] is not None else "no cuDNN")


def _human(report: dict[str, Any]) -> str:
    tc = report["tensor_cores"]
    t = report["torch"]
    drv = report["driver"]
    lines = [f"llamatelemetry {report['llamatelemetry']} on Python {report['python']}, {report['platform']}"]
    lines.append(
        f"torch {t['version']} ({_torch_build(t)}, CUDA available: {_yes(t['cuda_available'])}); "
        + (
            f"NVIDIA driver {drv['nvidia_driver'] or '(nvidia-smi not found)'}, CUDA {drv['cuda_driver'] or '?'}"
            if drv["nvidia_driver"] or drv["cuda_driver"]
            else "no NVIDIA driver found"
        )
    )
    lines.append(", ".join(f"{name} {version or 'not installed'}" for name, version in report["packages"].items()))
    env = report["environment_variables"]
    shown = ", ".join(f"{k}={v!r}" for k, v in env.items()) or "none set"
    lines.append(f"environment (LLAMATELEMETRY_*, CUDA_VISIBLE_DEVICES, TRITON_INTERPRET): {shown}")
    lines.extend(_device_lines(report))
    lines.append(
        f"Tensor Cores: {_yes(tc['present'])}; TF32: {_yes(tc['tf32'])} (matmul TF32 enabled: "
        f"{_yes(tc['tf32_matmul_enabled'])}); bf16: {_yes(tc['bf16'])}; fp8: {_yes(tc['fp8'])}"
    )
    lines.append(f"Triton: {_status_line(report['triton'])}")
    lines.append(f"flash-attn: {_status_line(report['flash_attn'])}")
    sdpa = report["sdpa_backends"]
    if sdpa and all(v == SDPA_NOT_PROBED for v in sdpa.values()):
        lines.append(f"SDPA backends: {', '.join(sdpa)}: {SDPA_NOT_PROBED}")
    else:
        lines.append(f"SDPA backends: {', '.join(f'{k} {_yes(v is None)}' for k, v in sdpa.items())}")
    lines.append("operations (implementation chosen here for a typical call):")
    if not report["operations"]:
        lines.append("  none registered by the installed components")
    on_gpu = report["device"]["kind"] == "cuda"
    for name, op in report["operations"].items():
        lines.append(f"  {name} [{op['dtype']}]: {op['selected']}{_measured_note(op, on_gpu)}")
        for cand in op["candidates"]:
            if cand["reason"] is not None:
                lines.append(f"      not {cand['name']}: {cand['reason']}")
    lines.append(f"summary: {report['summary']}")
    lines.append("components:")
    for dist, comp in report["components"].items():
        if comp["imports"]:
            state = comp["version"] or "installed (version unknown)"
        else:
            state = f"not installed; install with: {comp['install']}"
        where = f" -> {comp['path']}" if "path" in comp else ""
        lines.append(f"  {dist}: {state}{where}")
    outside = report["outside_tested_ranges"]
    lines.append(f"installed versions outside the tested ranges: {'none' if not outside else ''}".rstrip())
    lines.extend(f"  {o['distribution']} requires {o['requirement']}, installed {o['installed']}" for o in outside)
    return "\n".join(lines) + "\n"


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    description = (__doc__ or "").splitlines()[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="llamatelemetry", description=description)
    parser.add_argument("--version", action="version", version=f"llamatelemetry {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser(
        "doctor",
        help="report what this machine can run, which implementation each operation uses, and what it buys",
        description="Report what this machine can run, which implementation each operation uses, and what it buys.",
    )
    doctor.add_argument("--json", action="store_true", help="print one JSON object")
    doctor.add_argument("--simulate", metavar="DEVICE", help="answer as if this device were present (t4, h100, cpu)")
    return parser, {"doctor": doctor, **_engine_cli.register(sub)}


def _write(text: str) -> int:
    """Print ``text``; a closed or full output is reported once, on stderr, with exit status 1."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:  # BrokenPipeError for `| head`, ENOSPC for /dev/full
        # Point stdout at nothing, so that the interpreter's flush at exit does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        print(f"llamatelemetry doctor: cannot write the report: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser, subparsers = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported under the subcommand's own usage, not the top-level one
        subparsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
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
    return _write(json.dumps(report, indent=2, default=str) + "\n" if args.json else _human(report))
