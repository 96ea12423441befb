"""Tiles per device (a pure function shared by launcher and AOT provider), and compiling them for a T4."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from llamatelemetry_core.device import get_device_info, simulate_device
from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_core.gpu_specs import GPU_SPECS
from llamatelemetry_flashattn.tiles import MAX_HEAD_DIM, TileConfig, choose_tiles, padded_head_dim

HEAD_DIMS = (64, 80, 96, 128, 256)
T4_SPILL_BOUND = 512
"""Bytes of spill stores and loads per thread a T4 attention build may have (the tiles before: up to 167 KB)."""


@pytest.mark.parametrize("key", [s.key for s in GPU_SPECS])
def test_tiles_fit_every_known_gpu(key: str) -> None:
    with simulate_device(key) as device:
        limit = device.shared_memory_per_block_bytes
        assert limit is not None
        for head_dim in (*HEAD_DIMS, 16, 48, 200):
            for dtype in (torch.float16, torch.bfloat16):
                for rows in (None, 1, 4, 37, 4096):
                    tiles = choose_tiles(head_dim, dtype, device, rows_per_program=rows)
                    assert tiles.shared_memory_estimate(2) <= limit, (key, head_dim, rows, tiles)
                    assert tiles.block_d == padded_head_dim(head_dim) >= head_dim
                    assert min(tiles.block_m, tiles.block_n) >= 16 and tiles.num_warps in (4, 8)


def test_t4_gets_smaller_tiles_than_an_h100() -> None:
    with simulate_device("t4") as t4:
        small = [choose_tiles(d, torch.float16, t4) for d in HEAD_DIMS]
    with simulate_device("h100") as h100:
        big = [choose_tiles(d, torch.float16, h100) for d in HEAD_DIMS]
    assert all(s.block_m <= 64 for s in small)
    assert big[0] == TileConfig(64, 64, 64, 4, 3)
    assert big[3].block_m == 128 and big[3].block_n == 64 and big[3].num_stages >= 2
    assert all(b.block_m * b.block_n >= s.block_m * s.block_n for s, b in zip(small, big, strict=True))


def test_decode_tiles_shrink_to_the_rows() -> None:
    with simulate_device("h100") as h100:
        assert choose_tiles(128, torch.float16, h100, rows_per_program=4).block_m == 16
        assert choose_tiles(128, torch.float16, h100, rows_per_program=40).block_m == 64


def test_choice_is_a_pure_function_of_its_inputs() -> None:
    with simulate_device("a100") as a100:
        assert choose_tiles(96, torch.bfloat16, a100) == choose_tiles(96, torch.bfloat16, a100)
    with pytest.raises(ValueError, match="head_dim"):
        choose_tiles(MAX_HEAD_DIM + 8, torch.float16, get_device_info("cpu"))


def test_provider_is_registered_and_yields_what_the_library_launches() -> None:
    pytest.importorskip("triton")
    from llamatelemetry_flashattn import triton_kernel

    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="llamatelemetry.kernel_builds")}
    assert "flashattn" in eps
    provider = eps["flashattn"].load()
    with simulate_device("t4") as t4:
        builds = list(triton_kernel.aot_builds(t4, torch.float16))
        assert len(builds) == 2 * len(HEAD_DIMS)  # prefill + decode per head dim
        assert all(b.name.startswith("flashattn.fwd[fp16,") for b in builds)
        for build in builds:
            d = int(build.constexprs["HEAD_DIM"])
            rows = 4 if "decode" in build.name else None
            tiles = choose_tiles(d, torch.float16, t4, rows_per_program=rows)
            assert (build.constexprs["BLOCK_M"], build.constexprs["BLOCK_N"], build.num_warps, build.num_stages) == (
                tiles.block_m,
                tiles.block_n,
                tiles.num_warps,
                tiles.num_stages,
            )
        names = [b.name for b in provider(t4)]
        assert all("bf16" not in n for n in names)  # no bf16 on a T4
        assert {b.name for b in builds} <= set(names)
    with simulate_device("h100") as h100:
        assert any("bf16" in b.name for b in provider(h100))


def test_provider_yields_the_builds_of_every_kernel_module() -> None:
    """Each module with Triton kernels lists its own builds (``aot_builds``); the provider only loops over them,
    and forgets none (a new kernel module is covered, or this test names it)."""
    pytest.importorskip("triton")
    import pkgutil

    import llamatelemetry_flashattn

    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="llamatelemetry.kernel_builds")}
    assert [n for n in eps if n.startswith("flashattn")] == ["flashattn"]  # one provider for the package
    provider = eps["flashattn"].load()
    modules = [
        importlib.import_module(f"llamatelemetry_flashattn.{m.name}")
        for m in pkgutil.iter_modules(llamatelemetry_flashattn.__path__)
    ]
    with_builds = [m for m in modules if hasattr(m, "aot_builds")]
    assert {m.__name__.rsplit(".", 1)[1] for m in with_builds} == {"triton_kernel", "paged_kernel", "paged_merge"}
    with simulate_device("h100") as h100:
        expected = sorted(
            b.name for m in with_builds for dtype in (torch.float16, torch.bfloat16) for b in m.aot_builds(h100, dtype)
        )
        assert sorted(b.name for b in provider(h100)) == expected
        kernels = {getattr(b.kernel, "__name__", None) or b.kernel.fn.__name__ for b in provider(h100)}
    assert kernels == {"_attention_fwd_kernel", "_paged_attention_kernel", "_merge_splits_kernel"}


@pytest.mark.triton_compiler
@pytest.mark.skipif(
    triton_interpreter_enabled(),
    reason="the kernel calls a jitted helper, which cannot be compiled ahead of time under TRITON_INTERPRET=1 "
    "(run without the interpreter, as the t4 nox session does)",
)
@pytest.mark.parametrize("decode", [False, True], ids=["prefill", "decode"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_t4_builds_compile_within_64_kib_and_hardly_spill(head_dim: int, decode: bool) -> None:
    # sm_75 gets no mma.sync from Triton: the dots' operands sit in registers, and tiles that are too large spill
    # tens of KB per thread (64x32 at d=128 in 4 warps: 58 KB). The T4 tiles keep it to at most 16 bytes with
    # Triton 3.6 (block pointers) and 128-280 with 3.9 (pointer arithmetic): T4_SPILL_BOUND.
    from llamatelemetry_core.aot import compile_build
    from llamatelemetry_flashattn.triton_kernel import aot_build

    with simulate_device("t4") as t4:
        report = compile_build(aot_build(head_dim, torch.float16, t4, decode=decode), t4)
    assert report.ok, report.problems
    assert report.target == "sm_75"
    assert report.shared_memory_bytes <= 64 * 1024 == report.shared_memory_limit_bytes
    assert report.spill_bytes is not None and report.spill_bytes <= T4_SPILL_BOUND, report


@pytest.mark.triton_compiler
@pytest.mark.skipif(
    triton_interpreter_enabled(),
    reason="the kernel calls a jitted helper, which cannot be compiled ahead of time under TRITON_INTERPRET=1 "
    "(run without the interpreter, as the t4 nox session does)",
)
def test_t4_paged_builds_hardly_spill() -> None:
    # As for the dense kernel: the Turing rows of the paged tile tables fit sm_75's FMA dots in registers (64x64
    # prefill tiles at d=128 in 4 warps spilled 167 KB per thread, int8 KV more).
    from llamatelemetry_core.aot import compile_build
    from llamatelemetry_flashattn import paged_kernel

    with simulate_device("t4") as t4:
        builds = list(paged_kernel.aot_builds(t4, torch.float16))
        reports = [compile_build(build, t4) for build in builds]
    assert len(reports) >= 4 and any("kv=i8" in r.build for r in reports)
    for report in reports:
        assert report.ok and report.spill_bytes is not None and report.spill_bytes <= T4_SPILL_BOUND, report
