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


@pytest.mark.triton_compiler
@pytest.mark.skipif(
    triton_interpreter_enabled(),
    reason="compiling ahead of time needs TRITON_INTERPRET unset (the t4 nox session runs it)",
)
@pytest.mark.parametrize(("device", "cc"), [("t4", 75), ("h100", 90)])
@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn], ids=["int8", "fp8"])
def test_quantizing_builds_divide_exactly(device: str, cc: int, kv_dtype: torch.dtype) -> None:
    """The scale and the scaled values use IEEE divisions (``div.rn``): Triton's ``/`` is an approximate division
    on GPUs, which made quantized codes differ from the reference's by one on a GPU while the CPU interpreter
    (exact numpy division) agreed. Checked in the PTX, so that no GPU is needed to catch it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llamatelemetry_kvcache.write_kernel import kernel_build

    with simulate_device(device) as info:
        if kv_dtype == torch.float8_e4m3fn and not info.capability_at_least(8, 9):
            pytest.skip(f"no fp8 storage on {device}")
        build = kernel_build(128, 8, torch.float16, kv_dtype, info)
    source = ASTSource(build.kernel, signature=dict(build.signature), constexprs=dict(build.constexprs))
    options = {"num_warps": build.num_warps, "num_stages": build.num_stages, "enable_fp_fusion": True}
    ptx = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options).asm["ptx"]
    assert "div.rn.f32" in ptx
    assert not any(approx in ptx for approx in ("div.full.f32", "div.approx.f32", "div.approx.ftz.f32")), (
        "an approximate fp32 division in the quantizing write kernel"
    )
