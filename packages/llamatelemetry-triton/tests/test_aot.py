"""The ahead-of-time build provider: every kernel, as it would be launched on a T4, an A100, an H100."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("triton", reason="ahead-of-time compilation needs Triton installed")

import torch

from llamatelemetry_core import aot
from llamatelemetry_core.device import simulate_device
from llamatelemetry_triton import aot as provider
from llamatelemetry_triton.heuristics import norm_config

pytestmark = pytest.mark.triton_compiler

FAMILIES = [
    "add",
    "add_broadcast",
    "layernorm_fwd",
    "layernorm_bwd",
    "rmsnorm_fwd",
    "rmsnorm_bwd",
    "fused_add_rmsnorm_fwd",
    "fused_add_rmsnorm_bwd",
    "fused_add_layernorm_fwd",
    "fused_add_layernorm_bwd",
    "softmax_fwd",
    "softmax_partial_stats",
    "softmax_normalize",
    "softmax_bwd",
    "argmax_chunk",
    "argmax_combine",
    "swiglu_fwd",
    "swiglu_bwd",
    "geglu_fwd",
    "geglu_bwd",
    "geglu_tanh_fwd",
    "geglu_tanh_bwd",
    "rope",
    "rope_paged_write",
    "linear",
    "rmsnorm_linear",
    "fused_add_rmsnorm_linear",
    "fused_add_rmsnorm_linear_swiglu",
    "swiglu_linear",
]


def _family(name: str) -> str:
    return name.removeprefix("triton.").split("[", 1)[0]


def test_provider_is_registered_under_the_entry_point() -> None:
    assert aot.discover_providers()["triton"] is provider.kernel_builds


@pytest.mark.parametrize("key", ["t4", "a100", "h100"])
def test_every_kernel_family_is_built_for_every_device(key: str) -> None:
    with simulate_device(key) as device:
        builds = list(provider.kernel_builds(device))
    names = [b.name for b in builds]
    assert len(names) == len(set(names)), "build names are unique"
    assert sorted({_family(n) for n in names}) == sorted(FAMILIES)
    has_bf16 = any("bf16" in n for n in names)
    assert has_bf16 == device.supports_bf16  # a T4 gets no bf16 builds


def test_t4_builds_use_the_runtime_choice() -> None:
    with simulate_device("t4") as t4:
        builds = {b.name: b for b in provider.kernel_builds(t4)}
        config = norm_config(4096, torch.float16, t4)
    build = next(b for n, b in builds.items() if n.startswith("triton.layernorm_fwd[fp16,N=4096"))
    assert build.constexprs["BLOCK_SIZE"] == config.block_size and build.num_warps == config.num_warps


_COMPILE_SCRIPT = """
import json, os, sys
from llamatelemetry_core.aot import compile_build
from llamatelemetry_core.device import simulate_device
from llamatelemetry_triton import aot
out = []
with simulate_device(os.environ.get("AOT_DEVICE", "t4")) as device:
    builds = list(aot.kernel_builds(device))
    for prefix in sys.argv[1:]:
        build = next(b for b in builds if b.name.startswith(prefix))
        r = compile_build(build, device)
        out.append({"name": r.build, "ok": r.ok, "problems": r.problems, "target": r.target,
                    "smem": r.shared_memory_bytes, "spills": r.spill_bytes, "warps": build.num_warps})
print(json.dumps(out))
"""


def _compile(prefixes: list[str], device: str = "t4") -> list[dict[str, Any]]:
    # In a fresh process with the interpreter off: Triton imported under TRITON_INTERPRET=1 (the cpu-triton
    # matrix) defines its own reduction helpers as interpreted functions, which the compiler cannot use.
    env = {**os.environ, "TRITON_INTERPRET": "0", "AOT_DEVICE": device}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, *prefixes], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    reports: list[dict[str, Any]] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["name"][: len(p)] for r, p in zip(reports, prefixes, strict=True)] == prefixes
    return reports


def test_representative_builds_compile_for_a_t4_and_fit() -> None:
    # In a fresh process with the interpreter off: Triton imported under TRITON_INTERPRET=1 (the cpu-triton
    # matrix) defines its own reduction helpers as interpreted functions, which the compiler cannot use.
    prefixes = [
        "triton.layernorm_fwd[fp16,N=4096",
        "triton.fused_add_rmsnorm_bwd[fp16,N=8192",
        "triton.softmax_partial_stats[fp16,32x128256",
        "triton.rope[fp16,D=128,neox",
    ]
    for report in _compile(prefixes):
        assert report["ok"], report
        assert report["target"] == "sm_75" and report["smem"] <= 64 * 1024


@pytest.mark.parametrize("device", ["t4", "h100"])
def test_the_largest_single_block_norms_hold_their_rows_without_spills(device: str) -> None:
    # 16384-element rows in 16 warps (every forward variant), and LayerNorm's 8192 in 8: the registers hold them.
    prefixes = [
        "triton.fused_add_layernorm_fwd[fp32,N=16384,BLOCK=16384,single]",
        "triton.fused_add_rmsnorm_fwd[fp16,N=16384,BLOCK=16384,single]",
        "triton.fused_add_layernorm_fwd[fp16,N=8192,BLOCK=8192,single]",
    ]
    reports = _compile(prefixes, device)
    assert [r["warps"] for r in reports] == [16, 16, 8]
    for report in reports:
        assert report["ok"] and report["spills"] == 0, report


@pytest.mark.parametrize("device", ["t4", "h100"])
def test_the_largest_single_block_norm_backwards_and_their_measured_spills(device: str) -> None:
    # The largest held rows (8192, fp32 too) fit with no spills. At 16384 (2-byte rows) nothing fits: RMSNorm
    # holds the row in 16 warps and LayerNorm reads it twice in 32, both chosen by timing on an H200 with their
    # spills (stores + loads per thread, Triton 3.6: RMSNorm 96-136 bytes, LayerNorm 8-128). The bounds keep
    # those from growing unnoticed.
    t = "bf16" if device == "h100" else "fp16"
    held = [
        f"triton.layernorm_bwd[{t},N=8192,BLOCK=8192,single]",
        "triton.fused_add_layernorm_bwd[fp32,N=8192,BLOCK=8192,single]",
    ]
    spilling = {
        f"triton.rmsnorm_bwd[{t},N=16384,BLOCK=16384,single]": (16, 160),
        "triton.fused_add_rmsnorm_bwd[fp16,N=16384,BLOCK=16384,single]": (16, 160),
        "triton.layernorm_bwd[fp16,N=16384,BLOCK=16384,reread]": (32, 96),
        f"triton.fused_add_layernorm_bwd[{t},N=16384,BLOCK=16384,reread]": (32, 160),
    }
    reports = _compile([*held, *spilling], device)
    for report in reports:
        assert report["ok"], report
    assert [(r["warps"], r["spills"]) for r in reports[: len(held)]] == [(16, 0)] * len(held), reports
    for report, (warps, most) in zip(reports[len(held) :], spilling.values(), strict=True):
        assert report["warps"] == warps and report["spills"] <= most, report


@pytest.mark.parametrize("device", ["t4", "h100"])
def test_the_rotary_cache_store_compiles_without_spills(device: str) -> None:
    # Three programs per token share one kernel (q, k with its store, v's store): the registers of the largest
    # branch, 32 query heads of 128 rotated at once, hold without spilling (0 bytes on sm_75 and sm_90 under
    # Triton 3.6 when written).
    t = "bf16" if device == "h100" else "fp16"
    prefixes = [f"triton.rope_paged_write[{t},D=128,neox]", f"triton.rope_paged_write[{t},D=64,neox]"]
    for report in _compile(prefixes, device):
        assert report["ok"] and report["spills"] == 0, report
        assert report["smem"] <= 64 * 1024, report


@pytest.mark.parametrize("device", ["t4", "h100"])
def test_the_few_row_linear_builds_fit_with_at_most_small_spills(device: str) -> None:
    # One row and the most rows, plain, with the fused add + norm, the SwiGLU epilogue and its prologue: the tiles
    # stay in registers (Triton 3.6: no spills anywhere; Triton 3.9 spilled 16 bytes per thread in one sm_90
    # build with an earlier launch row, the fused add + norm at 8 rows; the bound keeps spills from growing). On
    # sm_90 the small-M Tensor Core builds (64 rows) are among them, and their pipelines fit in shared memory.
    with simulate_device(device) as info:
        names = [b.name for b in provider.kernel_builds(info) if "[fp16," in b.name]
    families = ("triton.linear", "triton.fused_add_rmsnorm_linear", "triton.fused_add_rmsnorm_linear_swiglu",
                "triton.swiglu_linear")  # fmt: skip
    prefixes = [n for n in names if n.split("[", 1)[0] in families]
    reports = _compile(prefixes, device)
    assert {r["name"].split("[", 1)[0] for r in reports} == set(families)
    assert any("small_m" in r["name"] for r in reports) == (device == "h100")
    for report in reports:
        assert report["ok"] and report["spills"] <= 16, report
        assert report["smem"] <= 227 * 1024, report
