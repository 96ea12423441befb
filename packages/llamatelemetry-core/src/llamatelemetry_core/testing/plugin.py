"""pytest plugin: hardware markers, skips decided by the real device, and a header saying what ran where.

Markers:

* ``gpu``: needs a CUDA device.
* ``sm75``, ``sm80``, ``sm86``, ``sm89``, ``sm90``, ``sm100``: needs a CUDA device of at least that compute
  capability.
* ``triton``: needs Triton able to run kernels on the test's device: a CUDA device, or ``TRITON_INTERPRET=1``
  for CPU tensors.
* ``triton_compiler``: needs Triton installed and its interpreter off (compiles kernels ahead of time; no device
  needed). The ``t4`` nox session runs these.
* ``no_triton``: needs Triton *absent* (the fallback matrix).
* ``flash_attn``: needs the flash-attn package usable on this device.

Skips always say why; run pytest with ``-rs`` to see them listed at the end.

Every test starts with the selection policy's memory cleared (fallback warnings already issued, kernel build
failures recorded): a kernel that fails to build fails each test that reaches it with its
``BackendFallbackWarning`` (an error under the repository's pytest settings), not only the first one.

With hypothesis installed, the plugin also registers the fuzz profiles of :mod:`llamatelemetry_core.testing.fuzz`
and loads the one ``LLAMATELEMETRY_FUZZ_PROFILE`` names (``ci`` by default, ``thorough`` for long runs).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from llamatelemetry_core.device import DeviceInfo, real_device_info
from llamatelemetry_core.environment import distribution_version, flash_attn_status, triton_interpreter_enabled
from llamatelemetry_core.selection import reset_fallback_warnings, reset_kernel_failures, reset_selection_cache

_CAPABILITY_MARKERS = {"sm75": (7, 5), "sm80": (8, 0), "sm86": (8, 6), "sm89": (8, 9), "sm90": (9, 0), "sm100": (10, 0)}


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    for name, (major, minor) in _CAPABILITY_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: needs a CUDA device of compute capability >= {major}.{minor}")
    config.addinivalue_line("markers", "triton: needs Triton able to run kernels (CUDA, or TRITON_INTERPRET=1)")
    config.addinivalue_line(
        "markers", "triton_compiler: needs Triton installed and TRITON_INTERPRET unset (ahead-of-time compilation)"
    )
    config.addinivalue_line("markers", "no_triton: needs Triton not installed (the fallback matrix)")
    config.addinivalue_line("markers", "flash_attn: needs the flash-attn package usable on this GPU")
    if importlib.util.find_spec("hypothesis") is not None:
        from llamatelemetry_core.testing.fuzz import register_fuzz_profiles

        register_fuzz_profiles()


def _skip_reason(item: pytest.Item, device: DeviceInfo) -> str | None:
    names = {m.name for m in item.iter_markers()}
    if "gpu" in names and not device.is_cuda:
        return "needs a CUDA device (gpu marker)"
    for name, (major, minor) in _CAPABILITY_MARKERS.items():
        if name in names and not device.capability_at_least(major, minor):
            return f"needs compute capability >= {major}.{minor} ({name} marker), have {device.name}"
    triton_ok = _triton_installed()
    if "triton" in names:
        if not triton_ok:
            return "needs Triton (triton marker): not installed"
        if not device.is_cuda and not triton_interpreter_enabled():
            return "needs Triton on a CUDA device, or TRITON_INTERPRET=1 on CPU (triton marker)"
    if "triton_compiler" in names:
        if not triton_ok:
            return "needs Triton installed (triton_compiler marker)"
        if triton_interpreter_enabled():
            return "needs TRITON_INTERPRET unset to compile kernels (triton_compiler marker): the t4 session runs it"
    if "no_triton" in names and triton_ok:
        return "needs Triton absent (no_triton marker): runs in the cpu-fallback matrix"
    if "flash_attn" in names:
        status = flash_attn_status(device)
        if not status.usable:
            return f"needs flash-attn (flash_attn marker): {status.reason}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    device = real_device_info()
    for item in items:
        reason = _skip_reason(item, device)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_runtest_setup(item: pytest.Item) -> None:
    reset_fallback_warnings()
    reset_kernel_failures()
    reset_selection_cache()  # re-reads LLAMATELEMETRY_BACKEND: a test that sets it mid-test calls it again


def pytest_report_header(config: pytest.Config) -> str:
    device = real_device_info()
    cc = "" if device.compute_capability is None else f" sm_{device.sm}"
    triton = (distribution_version("triton") or "installed") if _triton_installed() else "not installed"
    interp = ", interpreter on" if triton_interpreter_enabled() else ""
    versions = f"torch {torch.__version__}; triton {triton}{interp}"
    fuzz = os.environ.get("LLAMATELEMETRY_FUZZ_PROFILE", "").strip() or "ci"
    return f"llamatelemetry: device {device.kind}: {device.name}{cc}; {versions}; fuzz profile {fuzz}"
