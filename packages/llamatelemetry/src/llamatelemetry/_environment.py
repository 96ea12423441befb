"""Facts about the software around llamatelemetry that ``doctor`` reports (what ``collect_env`` tools report).

Driver and CUDA versions, every visible GPU, the versions of the packages the components use, the environment
variables that change what runs, installed versions outside the ranges our distributions declare, and the
ratios measured by ``benchmarks/`` for a GPU model (shipped as ``measured.json``).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
import json
import os
import shutil
import subprocess
from typing import Any

import torch

from llamatelemetry_core.device import real_device_info
from llamatelemetry_core.environment import distribution_version
from llamatelemetry_core.toolchain import untested_versions

__all__ = [
    "ENVIRONMENT_VARIABLES",
    "THIRD_PARTY",
    "driver_versions",
    "environment_variables",
    "measured_results",
    "outside_tested_ranges",
    "package_versions",
    "visible_gpus",
]

THIRD_PARTY = ("triton", "transformers", "flash-attn", "numpy")
"""Packages the components use when present; their versions are reported beside torch's."""
ENVIRONMENT_VARIABLES = ("CUDA_VISIBLE_DEVICES", "TRITON_INTERPRET")
"""Variables reported beside every ``LLAMATELEMETRY_*`` one: both change which device and kernels run."""


def package_versions() -> dict[str, str | None]:
    """Installed version of each package of :data:`THIRD_PARTY` (``None``: not installed)."""
    return {name: distribution_version(name) for name in THIRD_PARTY}


def environment_variables() -> dict[str, str]:
    """The ``LLAMATELEMETRY_*`` variables and those of :data:`ENVIRONMENT_VARIABLES` that are set, by name."""
    return {
        name: value
        for name, value in sorted(os.environ.items())
        if name.startswith("LLAMATELEMETRY_") or name in ENVIRONMENT_VARIABLES
    }


def _nvidia_smi_driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        proc = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def driver_versions() -> dict[str, str | None]:
    """The NVIDIA driver (from ``nvidia-smi``), the CUDA version the driver supports and the one torch was built
    with (``None`` where there is no driver, or torch has no CUDA)."""
    cuda_driver = None
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is not None and torch.cuda.is_available():
        try:
            version = int(get())
            cuda_driver = f"{version // 1000}.{version % 1000 // 10}"
        except (RuntimeError, TypeError, ValueError):
            cuda_driver = None
    return {"nvidia_driver": _nvidia_smi_driver(), "cuda_driver": cuda_driver, "cuda_runtime": torch.version.cuda}


def visible_gpus() -> list[dict[str, Any]]:
    """Every CUDA device this process sees (real ones only, whatever is simulated)."""
    if not torch.cuda.is_available():
        return []
    return [real_device_info(index).to_dict() for index in range(torch.cuda.device_count())]


def _installed_llamatelemetry() -> list[importlib.metadata.Distribution]:
    seen: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if (name == "llamatelemetry" or name.startswith("llamatelemetry-")) and name not in seen:
            seen[name] = dist
    return [seen[name] for name in sorted(seen)]


def outside_tested_ranges() -> list[dict[str, str]]:
    """Each requirement of an installed llamatelemetry distribution that the installed version does not meet.

    Read from each distribution's ``Requires-Dist``; a requirement of an extra counts when its package is
    installed, one for another platform does not. torch and Triton are also checked against core's tested ranges
    directly (``llamatelemetry_core.toolchain``), which needs no metadata: sources put on the path by hand have
    none, and "none outside" would then mean "not checked". Entries: ``distribution``, ``requirement``,
    ``installed``.
    """
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version

    found: list[dict[str, str]] = []
    for dist in _installed_llamatelemetry():
        for line in dist.requires or []:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            marker = requirement.marker
            if marker is not None and "extra" not in str(marker) and not marker.evaluate({"extra": ""}):
                continue  # for another platform
            installed = distribution_version(requirement.name)
            if installed is None:
                continue  # an extra's package that is not installed; a missing dependency fails on import
            try:
                ok = requirement.specifier.contains(Version(installed), prereleases=True)
            except InvalidVersion:
                ok = False
            if not ok:
                name = str(dist.metadata["Name"])
                found.append({"distribution": name, "requirement": line, "installed": installed})
    reported = {Requirement(f["requirement"]).name for f in found}
    for check in untested_versions():
        if check.package not in reported and check.installed is not None:
            tested = f"{check.package}{check.tested}"
            found.append({"distribution": "llamatelemetry-core", "requirement": tested, "installed": check.installed})
    return found


@functools.cache
def measured_results() -> dict[str, Any]:
    """The summary of ``benchmarks/results/`` shipped with the package (``scripts/benchmark_summary.py``)."""
    text = importlib.resources.files("llamatelemetry").joinpath("measured.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data
