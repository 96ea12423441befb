"""The write kernel's builds per device, and compiling them for a T4 (sm_75) without a GPU."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from llamatelemetry_core.device import simulate_device
from llamatelemetry_core.environment import triton_interpreter_enabled

pytest.importorskip("triton")


def test_provider_is_registered_and_follows_the_device() -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="llamatelemetry.kernel_builds")}
    assert "kvcache" in eps
    provider = eps["kvcache"].load()
    with simulate_device("t4") as t4:
        names = [b.name for b in provider(t4)]
    assert len(names) == 6  # fp16 and int8 for head dims 64, 128, 256: no bf16, no fp8 on a T4
    assert not any("bf16" in n or "fp8" in n for n in names)
    with simulate_device("h100") as h100:
        names = [b.name for b in provider(h100)]
    assert len(names) == 12 and any("fp8e4nv" in n for n in names) and any("bf16" in n for n in names)


def test_tiles_stay_within_4096_elements() -> None:
    from llamatelemetry_kvcache.write_kernel import write_tiles

    for heads in (1, 3, 8, 32, 64):
        for dim in (8, 24, 64, 128, 256):
            block_h, block_d, warps = write_tiles(heads, dim)
            assert block_d >= dim and block_h * block_d <= 4096 and warps in (1, 2, 4)


@pytest.mark.triton_compiler
@pytest.mark.skipif(
    triton_interpreter_enabled(),
    reason="the kernel calls a jitted helper, which cannot be compiled ahead of time under TRITON_INTERPRET=1 "
    "(run without the interpreter, as the t4 nox session does)",
)
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int8], ids=["fp16", "int8"])
def test_t4_builds_compile_within_its_limits(kv_dtype: torch.dtype) -> None:
    from llamatelemetry_core.aot import compile_build
    from llamatelemetry_kvcache.write_kernel import kernel_build

    with simulate_device("t4") as t4:
        report = compile_build(kernel_build(128, 8, torch.float16, kv_dtype, t4), t4)
    assert report.ok, report.problems
    assert report.target == "sm_75"
