"""Repository rules that keep the distributions independent (run from the monorepo only)."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from llamatelemetry_core.toolchain import TESTED_RANGES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

PACKAGES = Path(__file__).resolve().parents[2]
ROOT = PACKAGES.parent
COMPONENT_DIRS = sorted(p for p in PACKAGES.glob("llamatelemetry-*") if p.is_dir())
ALL_DIRS = [*COMPONENT_DIRS, PACKAGES / "llamatelemetry"]

pytestmark = pytest.mark.skipif(
    not (ROOT / "noxfile.py").is_file() or not (PACKAGES / "llamatelemetry-core").is_dir(),
    reason="needs the monorepo checkout",
)
# The engine composes every component (it is above them all, below the meta-package only).


def _noxfile_constant(name: str) -> object:
    """A module-level constant of the noxfile, read without importing it (nox may not be installed)."""
    for node in ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in noxfile.py")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _import_name(package_dir: Path) -> str:
    return (
        "llamatelemetry_" + package_dir.name.removeprefix("llamatelemetry-")
        if package_dir.name != "llamatelemetry"
        else "llamatelemetry"
    )


def _declared(package_dir: Path) -> set[str]:
    """The import names of our packages that ``package_dir``'s pyproject.toml requires (extras included)."""
    project = tomllib.loads((package_dir / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    names = {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].replace("-", "_") for r in requirements}
    return {n for n in names if n == "llamatelemetry" or n.startswith("llamatelemetry_")}


@pytest.mark.parametrize("package_dir", ALL_DIRS, ids=lambda p: p.name)
def test_imports_follow_the_declared_dependencies(package_dir: Path) -> None:
    own = _import_name(package_dir)
    allowed = {own, *_declared(package_dir)}
    for source in (package_dir / "src").rglob("*.py"):
        for name in _imports(source):
            top = name.split(".")[0]
            if top == "llamatelemetry" or top.startswith("llamatelemetry_"):
                assert top in allowed, (
                    f"{source} imports {name}, but {package_dir.name}/pyproject.toml does not require "
                    f"{top.replace('_', '-')} (declared: {sorted(allowed - {own})})"
                )


def test_declared_dependencies_have_no_cycle() -> None:
    graph = {_import_name(d): _declared(d) - {_import_name(d)} for d in ALL_DIRS}
    done: set[str] = set()

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"dependency cycle: {' -> '.join((*path, node))}"
        if node in done:
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, (*path, node))
        done.add(node)

    for node in sorted(graph):
        visit(node, ())
    assert graph["llamatelemetry_core"] == set(), "core depends on none of our packages"


def test_every_list_of_packages_is_derived_from_the_packages_folder() -> None:
    run_matrix = _script("run_matrix")
    folders = {p.name for p in ALL_DIRS}
    assert set(run_matrix.PACKAGES.values()) == folders
    # The meta-package is installed from a wheel too, so its component table is written out: it must match.
    from llamatelemetry._components import COMPONENTS

    components = {p.name for p in COMPONENT_DIRS if p.name != "llamatelemetry-core"}
    assert {c.distribution for c in COMPONENTS.values()} == components, (
        "every component package has an entry in packages/llamatelemetry/src/llamatelemetry/_components.py"
    )
    ruff = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["ruff"]["lint"]["isort"]
    patterns = ruff["known-first-party"]
    for import_name in (_import_name(d) for d in ALL_DIRS):
        assert any(re.fullmatch(p.replace("*", ".*"), import_name) for p in patterns), (
            f"{import_name} is not first-party for ruff ({patterns})"
        )


@pytest.mark.parametrize("package_dir", ALL_DIRS, ids=lambda p: p.name)
def test_each_distribution_is_complete_and_versioned(package_dir: Path) -> None:
    meta = tomllib.loads((package_dir / "pyproject.toml").read_text(encoding="utf-8"))
    project = meta["project"]
    import_name = project["name"].replace("-", "_")
    src = package_dir / "src" / import_name
    assert (src / "py.typed").exists()
    assert (package_dir / "CHANGELOG.md").exists() and (package_dir / "README.md").exists()
    assert list((package_dir / "tests").glob("test_*.py")), "every package has tests"
    assert meta["build-system"]["build-backend"] == "hatchling.build"
    # nox installs this backend once per session for the editable installs (no isolated build environments).
    assert meta["build-system"]["requires"] == [_noxfile_constant("BUILD_BACKEND")]
    assert meta["tool"]["hatch"]["version"]["path"] == f"src/{import_name}/__about__.py"
    about = (src / "__about__.py").read_text(encoding="utf-8")
    version = re.search(r'__version__ = "([^"]+)"', about)
    assert version is not None
    assert importlib.import_module(import_name).__version__ == version.group(1)
    assert importlib.metadata.version(project["name"]) == version.group(1)
    for requirement in project.get("dependencies", []):
        if requirement.startswith("llamatelemetry"):
            assert "==" not in requirement and "<" in requirement, f"sibling pins must be ranges: {requirement}"
        if requirement.startswith(("torch", "triton")):
            _check_tested_range(requirement)


_TRITON_PLATFORMS = "sys_platform == 'linux' and platform_machine == 'x86_64'"


def _check_tested_range(requirement: str) -> None:
    """torch and Triton are required at exactly the tested ranges of ``llamatelemetry_core.toolchain``."""
    name = "triton" if requirement.startswith("triton") else "torch"
    expected = f"{name}{TESTED_RANGES[name]}" + (f"; {_TRITON_PLATFORMS}" if name == "triton" else "")
    assert requirement == expected, (
        f"expected {expected!r} (the tested range, llamatelemetry_core.toolchain.TESTED_RANGES), got {requirement!r}"
    )


def test_meta_extras_cover_every_component() -> None:
    meta = tomllib.loads((PACKAGES / "llamatelemetry" / "pyproject.toml").read_text(encoding="utf-8"))
    extras = meta["project"]["optional-dependencies"]
    components = [p.name for p in COMPONENT_DIRS if p.name != "llamatelemetry-core"]
    for name in components:
        extra = name.removeprefix("llamatelemetry-")
        assert extras[extra] == [f"{name}>=0.1,<0.2"]
    assert sorted(extras["all"]) == sorted(f"{n}>=0.1,<0.2" for n in components)
    assert meta["project"]["scripts"]["llamatelemetry"] == "llamatelemetry.cli:main"


@pytest.mark.parametrize("package_dir", ALL_DIRS, ids=lambda p: p.name)
def test_each_distribution_ships_the_license_it_declares(package_dir: Path) -> None:
    project = tomllib.loads((package_dir / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0"
    # Each folder is built on its own, so each holds a copy (hatchling puts LICENSE* in the wheel's metadata).
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert (package_dir / "LICENSE").read_text(encoding="utf-8") == license_text


@pytest.mark.parametrize("package_dir", ALL_DIRS, ids=lambda p: p.name)
def test_package_readmes_link_nothing_relative(package_dir: Path) -> None:
    # A README is the package index's project page, where a relative link leads nowhere.
    readme = (package_dir / "README.md").read_text(encoding="utf-8")
    relative = re.findall(r"\]\((?!https?://|#)([^)]*)\)", readme)
    assert not relative, f"{package_dir.name}/README.md links relative paths: {relative}"


def test_meta_extras_use_normalized_names_and_the_components_own_extras() -> None:
    meta = tomllib.loads((PACKAGES / "llamatelemetry" / "pyproject.toml").read_text(encoding="utf-8"))
    extras = meta["project"]["optional-dependencies"]
    for name in extras:  # PEP 685: lower case, runs of "-", "_", "." written as one "-"
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), f"extra {name!r} is not a normalized name"
    flashattn = tomllib.loads((PACKAGES / "llamatelemetry-flashattn" / "pyproject.toml").read_text(encoding="utf-8"))
    own = flashattn["project"]["optional-dependencies"]
    for extra in ("flash-attn", "transformers"):
        assert extra in own
        assert extras[extra] == [f"llamatelemetry-flashattn[{extra}]>=0.1,<0.2"]


def _script(name: str) -> ModuleType:
    """A module of ``scripts/`` (run_matrix, new_package), imported from the checkout."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_every_package_with_triton_kernels_is_a_kernel_package() -> None:
    # The newest-Triton matrix and the t4 sessions cover the kernel packages only: a package that defines a
    # Triton kernel must register its builds, or it would drop out of both.
    run_matrix = _script("run_matrix")
    jitted = sorted(
        name
        for name, folder in run_matrix.PACKAGES.items()
        if any("triton.jit" in f.read_text(encoding="utf-8") for f in (PACKAGES / folder / "src").rglob("*.py"))
    )
    assert jitted, "no package defines a Triton kernel: the scan is wrong"
    assert sorted(run_matrix.kernel_packages()) == jitted


def test_a_new_package_from_the_template_is_discovered(tmp_path: Path) -> None:
    new_package, run_matrix = _script("new_package"), _script("run_matrix")
    assert new_package.main(["demo", "A demonstration package.", "--root", str(tmp_path)]) == 0
    assert new_package.main(["demo", "again", "--root", str(tmp_path)]) == 2  # never overwrites
    (tmp_path / "_notes").mkdir()
    assert run_matrix.discover_packages(tmp_path) == {"demo": "llamatelemetry-demo"}
    made = tmp_path / "llamatelemetry-demo"
    assert run_matrix.kernel_packages(tmp_path) == []  # until it registers kernel builds
    with (made / "pyproject.toml").open("a", encoding="utf-8") as f:
        f.write('\n[project.entry-points."llamatelemetry.kernel_builds"]\ndemo = "llamatelemetry_demo:builds"\n')
    assert run_matrix.kernel_packages(tmp_path) == ["demo"]
    project = tomllib.loads((made / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert _declared(made) == {"llamatelemetry_core"}
    for requirement in project["dependencies"]:
        if requirement.startswith("torch"):
            _check_tested_range(requirement)
    assert (made / "src" / "llamatelemetry_demo" / "py.typed").exists()
    assert (made / "tests" / "test_package.py").exists()
    assert (made / "LICENSE").read_text(encoding="utf-8") == (ROOT / "LICENSE").read_text(encoding="utf-8")
