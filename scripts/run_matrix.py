"""Run the test suites of the monorepo in one of the three test matrices.

    python scripts/run_matrix.py cpu-fallback   # Triton absent: every operation runs its PyTorch reference
    python scripts/run_matrix.py cpu-triton     # Triton installed, TRITON_INTERPRET=1: kernels run on CPU tensors
    python scripts/run_matrix.py gpu            # a CUDA GPU: every test, GPU-marked ones included
    python scripts/run_matrix.py cpu-compile -- -m triton_compiler   # Triton's compiler, no GPU, no interpreter

``--package NAME`` (repeatable) limits the run to some packages (core, meta, and every
``packages/llamatelemetry-NAME`` folder); extra arguments after ``--`` go to pytest. The nox sessions call this
after installing the packages. ``--in-place`` runs from the source tree without installing anything (no network,
no nox, no build backend needed): the packages' ``src`` folders go on ``PYTHONPATH`` beside generated metadata, so
versions and entry points resolve as if they were installed. That is the one command for the GPU matrix on a
machine that has torch and Triton but no network:

    python scripts/run_matrix.py gpu --in-place
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def discover_packages(packages_dir: Path | None = None) -> dict[str, str]:
    """Every distribution under ``packages/``, short name -> folder: the one list of packages.

    ``llamatelemetry-<name>`` is ``<name>``, the meta-package ``llamatelemetry`` is ``meta``; folders starting
    with ``_`` or ``.``, or without a ``pyproject.toml``, are not packages. Order: core first, the meta-package
    last, the others by name (a new package is a new folder: ``python scripts/new_package.py NAME``).
    """
    base = packages_dir if packages_dir is not None else ROOT / "packages"
    found: dict[str, str] = {}
    for folder in sorted(base.iterdir()):
        if folder.name.startswith(("_", ".")) or not (folder / "pyproject.toml").is_file():
            continue
        if folder.name == "llamatelemetry":
            found["meta"] = folder.name
        elif folder.name.startswith("llamatelemetry-"):
            found[folder.name.removeprefix("llamatelemetry-")] = folder.name
    order = sorted(found, key=lambda n: (n != "core", n == "meta", n))
    return {name: found[name] for name in order}


PACKAGES = discover_packages()

KERNEL_BUILDS_GROUP = "llamatelemetry.kernel_builds"


def kernel_packages(packages_dir: Path | None = None) -> list[str]:
    """The packages that carry Triton kernels: those whose ``pyproject.toml`` registers kernel builds (the
    ``llamatelemetry.kernel_builds`` entry point that ahead-of-time compilation reads), in :data:`PACKAGES` order.

    These are where a Triton release changes behaviour; the packages above them call their public operations."""
    base = packages_dir if packages_dir is not None else ROOT / "packages"
    found = []
    for name, folder in discover_packages(base).items():
        project = tomllib.loads((base / folder / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        if KERNEL_BUILDS_GROUP in project.get("entry-points", {}):
            found.append(name)
    return found


MATRICES = ("cpu-fallback", "cpu-triton", "cpu-compile", "gpu")


def _fail(message: str) -> None:
    print(f"run_matrix: {message}", file=sys.stderr)
    sys.exit(2)


# The CPU matrices run as a CPU without native bf16 (cpu-fallback) and as one with it (cpu-triton), whatever
# the host has, so that a test which depends on the host's CPU flags fails on every machine. A value set by the
# caller wins.
_CPU_BF16 = {"cpu-fallback": "0", "cpu-triton": "1"}


def _matrix_environment(matrix: str) -> dict[str, str]:
    env = dict(os.environ)
    if matrix in _CPU_BF16:
        env.setdefault("LLAMATELEMETRY_CPU_BF16", _CPU_BF16[matrix])
    has_triton = importlib.util.find_spec("triton") is not None
    if matrix == "cpu-fallback":
        if has_triton:
            _fail("the cpu-fallback matrix needs Triton absent (pip uninstall triton), so that fallbacks are tested")
        env.pop("TRITON_INTERPRET", None)
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif matrix == "cpu-triton":
        if not has_triton or importlib.util.find_spec("numpy") is None:
            _fail("the cpu-triton matrix needs Triton and numpy installed (pip install triton numpy)")
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif matrix == "cpu-compile":
        # Ahead-of-time compilation (the triton_compiler tests): Triton's real compiler, so no interpreter.
        if not has_triton:
            _fail("the cpu-compile matrix needs Triton installed (pip install triton)")
        env["TRITON_INTERPRET"] = "0"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        import torch

        if not torch.cuda.is_available():
            _fail("the gpu matrix needs a CUDA GPU, and torch here sees none")
        env.pop("TRITON_INTERPRET", None)
    return env


def _write_metadata(target: Path) -> None:
    """Write a ``.dist-info`` per package under ``target``: name, version and entry points, nothing else."""
    for folder in PACKAGES.values():
        package_dir = ROOT / "packages" / folder
        project = tomllib.loads((package_dir / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        import_name = project["name"].replace("-", "_")
        about = (package_dir / "src" / import_name / "__about__.py").read_text(encoding="utf-8")
        version = about.split('"')[1]
        info = target / f"{import_name}-{version}.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {version}\n", encoding="utf-8"
        )
        groups = dict(project.get("entry-points", {}))
        if "scripts" in project:
            groups["console_scripts"] = project["scripts"]
        lines = [f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for g, eps in groups.items()]
        (info / "entry_points.txt").write_text("\n".join(lines), encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("matrix", choices=MATRICES)
    parser.add_argument("--package", action="append", choices=sorted(PACKAGES), dest="packages")
    parser.add_argument("--in-place", action="store_true", help="run from the source tree, installing nothing")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    pytest_args = argv[split + 1 :]

    env = _matrix_environment(args.matrix)
    selected = args.packages or list(PACKAGES)
    paths = [str(ROOT / "packages" / PACKAGES[p] / "tests") for p in selected]
    if not args.packages:
        paths.append(str(ROOT / "docs"))
    with tempfile.TemporaryDirectory(prefix="llamatelemetry-meta-") as tmp:
        if args.in_place:
            _write_metadata(Path(tmp))
            src = [str(ROOT / "packages" / folder / "src") for folder in PACKAGES.values()]
            env["PYTHONPATH"] = os.pathsep.join([*src, tmp, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        command = [sys.executable, "-m", "pytest", *paths, *pytest_args]
        print(f"run_matrix [{args.matrix}]: {' '.join(command)}", flush=True)
        code = subprocess.run(command, env=env, cwd=ROOT, check=False).returncode
    if code == 5:
        print("run_matrix: pytest collected no tests, which counts as a failure", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
