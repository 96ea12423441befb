"""Ahead-of-time compilation of Triton kernels for GPUs that are not here, checked against their limits.

A component that ships Triton kernels registers a *build provider* under the entry-point group
``llamatelemetry.kernel_builds``: a callable that takes a :class:`~llamatelemetry_core.device.DeviceInfo` and
yields the :class:`KernelBuild` s (kernel, argument types, constexprs, warps, stages) the library would launch on
that device. :func:`compile_build` compiles one for the device's compute capability with Triton's own compiler,
which needs no GPU (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 75, 32))``), and checks what the
compiled kernel needs against the device:

* shared memory per block (a T4 allows 64 KiB, an A100 163 KiB, an H100 227 KiB);
* threads per block (at most 1024);
* registers: at most 255 per thread and 65536 per block (``ptxas -v`` reports them);
* spills to local memory are reported, not failed.

``python -m llamatelemetry_core.aot --device t4 --device a100 --device h100`` does this for every installed
provider and exits non-zero when any build does not compile or exceeds a limit; the ``t4`` nox session runs it in
CI, with the pinned Triton and with the newest one (``t4-latest``). A build's signature must name every argument
of its kernel, in order.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamatelemetry_core.build_failures import build_failure_reason
from llamatelemetry_core.device import DeviceInfo, get_device_info, simulate_device
from llamatelemetry_core.environment import TRITON_INTERPRET_ENV, triton_interpreter_enabled
from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_core.toolchain import TRITON_INSTALL

__all__ = [
    "ENTRY_POINT_GROUP",
    "MAX_REGISTERS_PER_BLOCK",
    "MAX_REGISTERS_PER_THREAD",
    "MAX_THREADS_PER_BLOCK",
    "BuildProvider",
    "CompileReport",
    "KernelBuild",
    "compile_build",
    "discover_providers",
    "kernel_signature",
    "main",
]

ENTRY_POINT_GROUP = "llamatelemetry.kernel_builds"
MAX_THREADS_PER_BLOCK = 1024
MAX_REGISTERS_PER_THREAD = 255
MAX_REGISTERS_PER_BLOCK = 65536
_DEFAULT_MAX_JOBS = 8


@dataclass(frozen=True)
class KernelBuild:
    """One launch configuration of one Triton kernel, as the library would launch it on some device.

    ``signature`` maps each argument name of the kernel, in order, to a Triton type (``"*fp16"``, ``"i32"``,
    ``"fp32"``) or ``"constexpr"``; a type may end in ``":16"`` (``"*fp16:16"``, ``"i32:16"``) where the launch
    passes a 16-byte aligned pointer or a multiple of 16, which Triton's launcher specializes on (vector loads);
    ``constexprs`` gives the value of every constexpr argument.
    ``enable_fp_fusion`` is the launch option of that name: the library's launches pass ``True`` (multiply-adds
    fused, as every Triton release up to 3.9 does by default; 3.10 changes the default), and so does the build.
    """

    name: str
    kernel: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, int | float | bool | str] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    enable_fp_fusion: bool = True

    def __post_init__(self) -> None:
        missing = [a for a, t in self.signature.items() if t == "constexpr" and a not in self.constexprs]
        if missing:
            raise ConfigurationError(
                f"kernel build {self.name!r}: expected a value in constexprs for every constexpr argument, "
                f"missing {missing}"
            )


BuildProvider = Callable[[DeviceInfo], Iterable[KernelBuild]]


@dataclass(frozen=True)
class CompileReport:
    """What one build needs on one device, and which of the device's limits it exceeds."""

    build: str
    device: str
    target: str
    shared_memory_bytes: int
    shared_memory_limit_bytes: int
    threads_per_block: int
    registers_per_thread: int | None
    spill_bytes: int | None
    problems: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def _ptxas_path(arch: int) -> str | None:
    """The ptxas Triton itself uses for ``sm_<arch>`` (Triton 3.9 takes a newer one from sm_90 on)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return str(get_ptxas(arch).path)
    except (ImportError, AttributeError, TypeError):
        pass
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(bundled) if bundled.exists() else shutil.which("ptxas")


def _ptxas_resources(ptx: str) -> tuple[int | None, int | None, str | None]:
    """(registers per thread, spill bytes, error) from ``ptxas -v`` on the kernel's PTX."""
    target = re.search(r"^\s*\.target\s+(sm_(\d+)\w*)", ptx, flags=re.MULTILINE)
    ptxas = None if target is None else _ptxas_path(int(target.group(2)))
    if ptxas is None or target is None:
        return None, None, "ptxas not found: register use not checked"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx, encoding="utf-8")
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name={target.group(1)}", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        return None, None, f"ptxas failed: {proc.stderr.strip()[-500:]}"
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", proc.stderr)
    return (int(regs.group(1)) if regs else None, sum(int(s) for s in spills) if spills else 0, None)


def kernel_signature(kernel: Any, types: Mapping[str, str], default: str = "i32") -> dict[str, str]:
    """A :class:`KernelBuild` signature for ``kernel``: each of its arguments in order, ``"constexpr"`` for those
    annotated ``tl.constexpr``, ``types[name]`` for the others and ``default`` for the ones ``types`` leaves out.

    Raises :class:`ConfigurationError` when ``types`` names an argument the kernel lacks or a constexpr one.
    """
    import inspect

    parameters = inspect.signature(getattr(kernel, "fn", kernel)).parameters
    constexpr = {name for name, p in parameters.items() if "constexpr" in str(p.annotation)}
    wrong = sorted(set(types) - (set(parameters) - constexpr))
    if wrong:
        raise ConfigurationError(
            f"expected types for runtime arguments of {getattr(kernel, '__name__', 'the kernel')} "
            f"({[n for n in parameters if n not in constexpr]}), got {wrong}, which it lacks or takes as constexpr"
        )
    return {name: "constexpr" if name in constexpr else types.get(name, default) for name in parameters}


def _check_arguments(build: KernelBuild) -> None:
    """The signature must name every argument of the kernel, in order: Triton versions differ in what they do
    with a missing one (some compile the kernel without it, others fail deep in code generation)."""
    expected = list(getattr(build.kernel, "arg_names", build.signature))
    given = list(build.signature)
    if given != expected:
        missing = [a for a in expected if a not in build.signature]
        unknown = [a for a in given if a not in expected]
        raise ConfigurationError(
            f"kernel build {build.name!r}: expected a signature naming the arguments of "
            f"{getattr(build.kernel, '__name__', 'the kernel')} in order {expected}, got {given} "
            f"(missing {missing}, unknown {unknown}); fix the build provider"
        )


def _failed_to_compile(build: KernelBuild, device: DeviceInfo, error: str) -> CompileReport:
    """The report of a build that Triton's compiler rejects: a failure of the check, not a crash of it."""
    import triton

    major, minor = device.compute_capability or (0, 0)
    return CompileReport(
        build=build.name,
        device=device.name,
        target=f"sm_{major * 10 + minor}",
        shared_memory_bytes=0,
        shared_memory_limit_bytes=device.shared_memory_per_block_bytes or 0,
        threads_per_block=build.num_warps * 32,
        registers_per_thread=None,
        spill_bytes=None,
        problems=(f"does not compile with triton {triton.__version__}: {error}",),
    )


def compile_build(build: KernelBuild, device: DeviceInfo) -> CompileReport:
    """Compile ``build`` for ``device`` (real or simulated) and check it against the device's limits."""
    if not device.is_cuda or device.compute_capability is None or device.shared_memory_per_block_bytes is None:
        raise ConfigurationError(f"expected a CUDA device to compile for, got {device.name} ({device.kind})")
    if triton_interpreter_enabled():
        # Under the interpreter @triton.jit yields interpreted functions (Triton's own helpers such as tl.sum
        # included), which the compiler cannot take: compiling would fail, or pass only from a warm cache.
        raise CapabilityError(
            f"cannot compile {build.name!r} ahead of time while {TRITON_INTERPRET_ENV}=1 is set; run the "
            f"compilation in a process without it ({TRITON_INTERPRET_ENV}=0), as the t4 nox session does"
        )
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:
        raise CapabilityError(f"compiling kernels ahead of time needs Triton: {TRITON_INSTALL} ({exc})") from exc

    _check_arguments(build)
    major, minor = device.compute_capability
    cc = major * 10 + minor
    # "*fp16:16" / "i32:16" (triton.tools.compile's notation): the argument is divisible by 16, as Triton's launcher
    # specializes aligned pointers and such integers at run time (vector loads and stores follow from it).
    types = {name: t.split(":", 1)[0] for name, t in build.signature.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(build.signature.values()) if t.endswith(":16")}
    source = ASTSource(build.kernel, signature=types, constexprs=dict(build.constexprs), attrs=attrs)
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", cc, 32),
        options={
            "num_warps": build.num_warps,
            "num_stages": build.num_stages,
            "enable_fp_fusion": build.enable_fp_fusion,
        },
    )
    shared = int(compiled.metadata.shared)
    limit = device.shared_memory_per_block_bytes
    threads = build.num_warps * 32
    regs, spills, note = _ptxas_resources(compiled.asm["ptx"])
    problems: list[str] = []
    if shared > limit:
        problems.append(
            f"needs {shared} bytes of shared memory per block, {device.name} allows {limit}: "
            f"use smaller blocks or fewer stages on this device"
        )
    if threads > MAX_THREADS_PER_BLOCK:
        problems.append(f"launches {threads} threads per block, at most {MAX_THREADS_PER_BLOCK} are allowed")
    if regs is not None:
        if regs > MAX_REGISTERS_PER_THREAD:
            problems.append(f"uses {regs} registers per thread, at most {MAX_REGISTERS_PER_THREAD}")
        if regs * threads > MAX_REGISTERS_PER_BLOCK:
            problems.append(
                f"uses {regs} registers x {threads} threads = {regs * threads} per block, "
                f"at most {MAX_REGISTERS_PER_BLOCK}: the launch would fail; use fewer warps"
            )
    notes = [note] if note else []
    if spills:
        notes.append(f"spills {spills} bytes to local memory")
    return CompileReport(
        build=build.name,
        device=device.name,
        target=f"sm_{cc}",
        shared_memory_bytes=shared,
        shared_memory_limit_bytes=limit,
        threads_per_block=threads,
        registers_per_thread=regs,
        spill_bytes=spills,
        problems=tuple(problems),
        notes=tuple(notes),
    )


def discover_providers() -> dict[str, BuildProvider]:
    """Every build provider installed under the ``llamatelemetry.kernel_builds`` entry-point group."""
    found: dict[str, BuildProvider] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.load()
    return found


def _compile_selected(
    device_keys: Sequence[str], providers: Mapping[str, BuildProvider], shard: int = 0, shards: int = 1
) -> list[tuple[int, CompileReport]]:
    """Compile the builds whose position (over every device and provider, in order) is ``shard`` modulo
    ``shards``; return them with their positions."""
    reports: list[tuple[int, CompileReport]] = []
    position = -1
    for key in device_keys:
        with simulate_device(key):
            device = get_device_info()
            for provider in providers.values():
                for build in provider(device):
                    position += 1
                    if position % shards != shard:
                        continue
                    try:
                        reports.append((position, compile_build(build, device)))
                    except Exception as exc:
                        error = build_failure_reason(exc)
                        if error is None:
                            raise
                        reports.append((position, _failed_to_compile(build, device, error)))
    return reports


def _installed(components: Sequence[str] | None) -> dict[str, BuildProvider]:
    found = discover_providers()
    if components is None:
        return found
    unknown = sorted(set(components) - set(found))
    if unknown:
        raise ConfigurationError(
            f"no installed kernel build provider named {unknown}; installed: {sorted(found) or 'none'} "
            f"(install the component, or leave out the name)"
        )
    return {name: found[name] for name in components}


def _compile_shard_of_installed(
    device_keys: Sequence[str], components: Sequence[str] | None, shard: int, shards: int
) -> list[tuple[int, CompileReport]]:
    """A worker process's share: the installed providers are found again there (kernels do not pickle)."""
    return _compile_selected(device_keys, _installed(components), shard, shards)


def compile_all(
    device_keys: Sequence[str],
    providers: Mapping[str, BuildProvider] | None = None,
    jobs: int = 1,
    components: Sequence[str] | None = None,
) -> list[CompileReport]:
    """Compile every build of every provider for each simulated device in ``device_keys``.

    ``providers`` defaults to the installed ones (those named in ``components``, or all). A build that Triton's
    compiler rejects gets a failed report saying why (see
    :func:`~llamatelemetry_core.build_failures.build_failure_reason`); any other error propagates. With ``jobs``
    above 1 the installed providers' builds are shared among that many worker processes (given ``providers`` are
    compiled in this process: they need not be importable elsewhere); the reports come back in the same order
    as from one process.
    """
    if jobs < 1:
        raise ConfigurationError(f"expected jobs >= 1 (worker processes), got {jobs}")
    if providers is not None and components is not None:
        raise ConfigurationError("expected providers or components (names of installed providers), not both")
    if providers is not None or jobs == 1:
        found = _installed(components) if providers is None else providers
        return [report for _, report in _compile_selected(device_keys, found)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: a forked child would inherit this process's torch and Triton state mid-flight
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        names = None if components is None else list(components)
        shares = [pool.submit(_compile_shard_of_installed, list(device_keys), names, n, jobs) for n in range(jobs)]
        positioned = [item for share in shares for item in share.result()]
    return [report for _, report in sorted(positioned, key=lambda item: item[0])]


def _format(report: CompileReport) -> str:
    regs = "?" if report.registers_per_thread is None else str(report.registers_per_thread)
    status = "ok" if report.ok else "FAIL"
    line = (
        f"{status:4} {report.target:7} {report.build:48} smem {report.shared_memory_bytes:>7}/"
        f"{report.shared_memory_limit_bytes:<7} threads {report.threads_per_block:>4} regs {regs:>3}"
    )
    extra = [*report.problems, *report.notes]
    return line + ("".join(f"\n       - {e}" for e in extra) if extra else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llamatelemetry_core.aot",
        description="Compile every registered Triton kernel build for GPUs that need not be present.",
    )
    parser.add_argument(
        "--device",
        action="append",
        dest="devices",
        metavar="KEY",
        help="GPU to compile for, e.g. t4, a100, h100 (repeatable; default: t4)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(os.cpu_count() or 1, _DEFAULT_MAX_JOBS),
        metavar="N",
        help=f"worker processes compiling in parallel (default: the number of CPUs, at most {_DEFAULT_MAX_JOBS}: "
        "each imports torch and Triton)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs expects a number of worker processes >= 1, got {args.jobs}")
    devices = args.devices or ["t4"]
    providers = discover_providers()
    # One process compiles the providers found here; workers find the installed ones again on their own.
    reports = compile_all(devices, providers, jobs=1) if args.jobs == 1 else compile_all(devices, jobs=args.jobs)
    for report in reports:
        print(_format(report))
    failed = [r for r in reports if not r.ok]
    print(
        f"{len(reports)} kernel builds from {len(providers)} components "
        f"({', '.join(sorted(providers)) or 'none installed'}) for {', '.join(devices)}: "
        f"{len(reports) - len(failed)} fit, {len(failed)} do not compile or exceed their device's limits"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
