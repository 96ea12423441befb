from __future__ import annotations

import re
from collections.abc import Iterable

import pytest

pytest.importorskip("triton", reason="ahead-of-time compilation needs Triton installed")

import triton
import triton.language as tl

from llamatelemetry_core import aot
from llamatelemetry_core.aot import KernelBuild, compile_all, compile_build, kernel_signature
from llamatelemetry_core.device import DeviceInfo, simulate_device
from llamatelemetry_core.errors import ConfigurationError

pytestmark = pytest.mark.triton_compiler


@triton.jit  # type: ignore[untyped-decorator]
def copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)


@triton.jit  # type: ignore[untyped-decorator]
def transpose_tile_kernel(x_ptr, y_ptr, M: tl.constexpr, N: tl.constexpr):  # type: ignore[no-untyped-def]
    # The transpose goes through shared memory: M * N * 4 bytes for fp32 tiles.
    rows = tl.arange(0, M)
    cols = tl.arange(0, N)
    tile = tl.load(x_ptr + rows[:, None] * N + cols[None, :])
    tl.store(y_ptr + cols[:, None] * M + rows[None, :], tl.trans(tile))


def _copy_build() -> KernelBuild:
    return KernelBuild(
        "copy[fp16,BLOCK=1024]",
        copy_kernel,
        {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"},
        {"BLOCK": 1024},
    )


def _transpose_build(m: int, n: int, num_warps: int) -> KernelBuild:
    return KernelBuild(
        f"transpose[fp32,{m}x{n}]",
        transpose_tile_kernel,
        {"x_ptr": "*fp32", "y_ptr": "*fp32", "M": "constexpr", "N": "constexpr"},
        {"M": m, "N": n},
        num_warps=num_warps,
        num_stages=1,
    )


@pytest.mark.parametrize(("key", "target"), [("t4", "sm_75"), ("a100", "sm_80"), ("h100", "sm_90")])
def test_small_kernel_fits_every_target(key: str, target: str) -> None:
    with simulate_device(key) as device:
        report = compile_build(_copy_build(), device)
    assert report.ok, report.problems
    assert report.target == target
    assert report.threads_per_block == 128
    assert report.registers_per_thread is not None and 0 < report.registers_per_thread <= 255


@pytest.mark.parametrize("key", ["t4", "h100"])
def test_divisibility_hints_give_the_vector_loads_of_a_real_launch(key: str) -> None:
    # Triton's launcher specializes aligned pointers and multiples of 16; a build says so with ":16". Without it
    # the masked copy compiles to scalar loads with an address each: several times the registers.
    def build(hint: str) -> KernelBuild:
        types = {"x_ptr": f"*fp16{hint}", "y_ptr": f"*fp16{hint}", "n": f"i32{hint}", "BLOCK": "constexpr"}
        return KernelBuild(f"copy[fp16{hint}]", copy_kernel, types, {"BLOCK": 2048}, num_warps=1)

    with simulate_device(key) as device:
        scalar, vector = compile_build(build(""), device), compile_build(build(":16"), device)
    assert scalar.ok and vector.ok, (scalar.problems, vector.problems)
    assert scalar.registers_per_thread is not None and vector.registers_per_thread is not None
    assert 2 * vector.registers_per_thread < scalar.registers_per_thread, (vector, scalar)


def test_kernel_over_t4_shared_memory_fails_there_only() -> None:
    build = _transpose_build(128, 256, num_warps=8)  # a 128 KiB fp32 tile goes through shared memory
    with simulate_device("t4") as t4:
        report = compile_build(build, t4)
    assert not report.ok
    assert report.shared_memory_bytes > 64 * 1024 == report.shared_memory_limit_bytes
    assert "shared memory per block" in report.problems[0] and "Tesla T4" in report.problems[0]
    with simulate_device("h100") as h100:
        assert compile_build(build, h100).ok


def test_cli_fails_when_a_registered_build_exceeds_limits(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def provider(device: DeviceInfo) -> Iterable[KernelBuild]:
        # Like a real provider: the configuration depends on the device it is asked about.
        yield _copy_build()
        tile = 64 if (device.shared_memory_per_block_bytes or 0) <= 64 * 1024 else 128
        yield _transpose_build(tile, 256, num_warps=8)

    monkeypatch.setattr(aot, "discover_providers", lambda: {"demo": provider})
    assert aot.main(["--device", "t4", "--device", "h100", "--jobs", "1"]) == 0
    assert "4 kernel builds from 1 components (demo) for t4, h100: 4 fit" in capsys.readouterr().out

    def greedy(device: DeviceInfo) -> Iterable[KernelBuild]:
        yield _transpose_build(128, 256, num_warps=8)

    monkeypatch.setattr(aot, "discover_providers", lambda: {"greedy": greedy})
    assert aot.main(["--device", "t4", "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL sm_75" in out and "1 do not compile or exceed" in out
    reports = compile_all(["h100"], {"greedy": greedy})
    assert len(reports) == 1 and reports[0].ok


def test_build_needs_every_constexpr() -> None:
    with pytest.raises(ConfigurationError, match=r"missing \['BLOCK'\]"):
        KernelBuild("copy", copy_kernel, {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"})
    with pytest.raises(ConfigurationError, match="expected a CUDA device"), simulate_device("cpu") as cpu:
        compile_build(_copy_build(), cpu)


def test_kernel_signature_follows_the_kernel() -> None:
    assert list(kernel_signature(copy_kernel, {"x_ptr": "*fp16", "y_ptr": "*fp32"}).items()) == [
        ("x_ptr", "*fp16"),
        ("y_ptr", "*fp32"),
        ("n", "i32"),
        ("BLOCK", "constexpr"),
    ]
    assert kernel_signature(transpose_tile_kernel, {}, default="*fp32") == {
        "x_ptr": "*fp32",
        "y_ptr": "*fp32",
        "M": "constexpr",
        "N": "constexpr",
    }
    for wrong in ({"z_ptr": "*fp16"}, {"BLOCK": "i32"}):
        with pytest.raises(ConfigurationError, match="which it lacks or takes as constexpr"):
            kernel_signature(copy_kernel, wrong)


@triton.jit  # type: ignore[untyped-decorator]
def removed_api_kernel(x_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.function_removed_in_this_release(offsets), mask=offsets < n)


def test_build_signature_must_name_every_kernel_argument_in_order() -> None:
    signatures = [
        {"x_ptr": "*fp16", "y_ptr": "*fp16", "BLOCK": "constexpr"},  # n forgotten
        {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr", "EXTRA": "constexpr"},
        {"y_ptr": "*fp16", "x_ptr": "*fp16", "n": "i32", "BLOCK": "constexpr"},
    ]
    for signature in signatures:
        build = KernelBuild("copy", copy_kernel, signature, {"BLOCK": 1024, "EXTRA": 1})
        with (
            pytest.raises(ConfigurationError, match=r"naming the arguments of copy_kernel in order"),
            simulate_device("t4") as t4,
        ):
            compile_build(build, t4)


def test_a_build_that_does_not_compile_is_a_failed_report_not_a_crash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def provider(device: DeviceInfo) -> Iterable[KernelBuild]:
        yield KernelBuild(
            "broken", removed_api_kernel, {"x_ptr": "*i32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 64}
        )
        yield _copy_build()

    reports = compile_all(["t4"], {"demo": provider})
    assert [r.ok for r in reports] == [False, True]
    assert "does not compile with triton" in reports[0].problems[0]
    assert "function_removed_in_this_release" in reports[0].problems[0]
    monkeypatch.setattr(aot, "discover_providers", lambda: {"demo": provider})
    assert aot.main(["--device", "t4", "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^FAIL sm_75 +broken .*\n +- does not compile with triton", out, flags=re.MULTILINE), out


def test_installed_providers_include_the_doctor_probe() -> None:
    providers = aot.discover_providers()
    assert "core" in providers
    reports = compile_all(["t4"], {"core": providers["core"]})
    assert [r.build for r in reports] == ["core.doctor_probe[fp32]"]
    assert reports[0].ok


def test_worker_processes_give_the_reports_of_one_process() -> None:
    serial = compile_all(["t4", "h100"], components=["core"])
    parallel = compile_all(["t4", "h100"], jobs=2, components=["core"])
    assert [r.target for r in serial] == ["sm_75", "sm_90"]
    assert parallel == serial


def test_bad_worker_and_component_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigurationError, match="expected jobs >= 1"):
        compile_all(["t4"], jobs=0)
    with pytest.raises(ConfigurationError, match="no installed kernel build provider named"):
        compile_all(["t4"], components=["no-such-component"])
    with pytest.raises(ConfigurationError, match="not both"):
        compile_all(["t4"], {}, components=["core"])
    with pytest.raises(SystemExit):
        aot.main(["--jobs", "0"])
    assert "--jobs expects a number of worker processes >= 1, got 0" in capsys.readouterr().err
