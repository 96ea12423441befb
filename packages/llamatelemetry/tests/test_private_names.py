"""No module reaches into another module's private names (run from the monorepo only).

A name with a leading underscore belongs to its module. What several modules of one package share lives in a
private *module* (``llamatelemetry_flashattn._attention_tile``) under public names, which the package's other
modules import freely; another package never imports a private module, and no module imports, or reads as an
attribute, a ``_name`` of another module (a kernel, a helper, a constant) in its own package or any other.
Tests may look inside their package; the rule is for the sources every wheel ships.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not (PACKAGES.parent / "noxfile.py").is_file() or not (PACKAGES / "llamatelemetry-core").is_dir(),
    reason="needs the monorepo checkout",
)

# (importing module, what it reaches) -> why that is right. Each entry must still occur (no stale exceptions).
ALLOWED: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Reach:
    """One place where ``module`` reaches a private name: ``target`` (``module.name`` or a private module)."""

    module: str
    line: int
    target: str
    how: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} {self.how} {self.target}"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _ours(module: str) -> bool:
    top = module.split(".")[0]
    return top == "llamatelemetry" or top.startswith("llamatelemetry_")


def _distribution(module: str) -> str:
    return module.split(".")[0]


def _private_module_part(module: str) -> bool:
    return any(_private(part) for part in module.split(".")[1:])


def collect_sources(roots: list[Path]) -> tuple[dict[str, str], set[str]]:
    """Every module under the ``src`` folders ``roots``: dotted name -> source text, and the names of packages."""
    sources: dict[str, str] = {}
    packages: set[str] = set()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
                packages.add(".".join(parts))
            sources[".".join(parts)] = path.read_text(encoding="utf-8")
    return sources, packages


def private_reaches(sources: Mapping[str, str], packages: set[str]) -> Iterator[Reach]:
    """Every import or attribute read of another module's private name, and every import of another package's
    private module, in ``sources`` (dotted module name -> text; ``packages`` says which names are packages)."""
    for module, text in sources.items():
        tree = ast.parse(text)
        bound: dict[str, str] = {}  # local name -> the module of ours it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if not _ours(alias.name):
                        continue
                    if alias.asname:
                        bound[alias.asname] = alias.name
                    else:
                        bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
                    yield from _module_reach(module, node.lineno, alias.name, "imports")
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, module in packages, node)
                if not _ours(source):
                    continue
                yield from _module_reach(module, node.lineno, source, "imports from")
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in sources:  # a submodule
                        bound[alias.asname or alias.name] = full
                        yield from _module_reach(module, node.lineno, full, "imports")
                    elif _private(alias.name):
                        yield Reach(module, node.lineno, full, "imports")
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            chain: list[str] = []
            value: ast.expr = node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in bound:
                owner = ".".join([bound[value.id], *reversed(chain)])
                if owner in sources and owner != module:
                    full = f"{owner}.{node.attr}"
                    if full in sources:
                        yield from _module_reach(module, node.lineno, full, "reads")
                    else:
                        yield Reach(module, node.lineno, full, "reads")


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _module_reach(module: str, line: int, target: str, how: str) -> Iterator[Reach]:
    """A private module is shared within its package only."""
    if _private_module_part(target) and _distribution(target) != _distribution(module):
        yield Reach(module, line, target, how)


def _reaches_in_repository() -> list[Reach]:
    sources, packages = collect_sources(sorted(PACKAGES.glob("*/src")))
    return list(private_reaches(sources, packages))


def assert_no_private_reaches(reaches: Iterable[Reach], allowed: Mapping[tuple[str, str], str] = ALLOWED) -> None:
    """Fail naming every reach that is not an allowed exception."""
    left = [r for r in reaches if (r.module, r.target) not in allowed]
    assert not left, (
        "a module uses another module's private name; make the name public in a private module of the package "
        "(e.g. `_attention_tile.py`), or move the code that needs it next to it:\n" + "\n".join(f"  {r}" for r in left)
    )


def test_no_module_reaches_into_another_modules_private_names() -> None:
    reaches = _reaches_in_repository()
    assert_no_private_reaches(reaches)
    stale = sorted(set(ALLOWED) - {(r.module, r.target) for r in reaches})
    assert not stale, f"remove these exceptions from ALLOWED, nothing reaches them any more: {stale}"


def _write(root: Path, module: str, text: str, *, package: bool = False) -> None:
    path = root.joinpath(*module.split("."))
    path = path / "__init__.py" if package else path.with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_the_check_finds_each_kind_of_reach(tmp_path: Path) -> None:
    demo, other = tmp_path / "demo" / "src", tmp_path / "other" / "src"
    _write(demo, "llamatelemetry_demo", '"""Demo."""\n', package=True)
    _write(demo, "llamatelemetry_demo._tile", "def tile() -> int:\n    return 1\n")
    _write(demo, "llamatelemetry_demo.kernels", "def _kernel() -> int:\n    return 2\n\n\n_ROWS = 4\n")
    _write(other, "llamatelemetry_other", "", package=True)
    _write(
        demo,
        "llamatelemetry_demo.builds",
        "from llamatelemetry_demo._tile import tile\n"  # a private module's public name: fine
        "from llamatelemetry_demo import _tile, kernels\n"  # the package's own private module: fine
        "from llamatelemetry_demo.kernels import _kernel\n"  # 3: a private kernel
        "from .kernels import _ROWS\n"  # 4: the same, relative
        "import llamatelemetry_demo.kernels as k\n"
        "from llamatelemetry_demo.kernels import __doc__ as doc\n"  # a dunder: fine
        "\n"
        "def build() -> object:\n"
        "    return (tile, _tile.tile, kernels._kernel, k._ROWS, doc)\n",  # 9: two private reads
    )
    _write(
        other,
        "llamatelemetry_other.use",
        "from llamatelemetry_demo._tile import tile\n"  # 1: another package's private module
        "import llamatelemetry_demo._tile\n"  # 2: the same
        "import llamatelemetry_demo\n"
        "\n"
        "def use() -> object:\n"
        "    return tile, llamatelemetry_demo.kernels._kernel\n",  # 6: a private read through a chain
    )
    sources, packages = collect_sources([demo, other])
    found = sorted((r.module, r.line, r.target) for r in private_reaches(sources, packages))
    assert found == [
        ("llamatelemetry_demo.builds", 3, "llamatelemetry_demo.kernels._kernel"),
        ("llamatelemetry_demo.builds", 4, "llamatelemetry_demo.kernels._ROWS"),
        ("llamatelemetry_demo.builds", 9, "llamatelemetry_demo.kernels._ROWS"),
        ("llamatelemetry_demo.builds", 9, "llamatelemetry_demo.kernels._kernel"),
        ("llamatelemetry_other.use", 1, "llamatelemetry_demo._tile"),
        ("llamatelemetry_other.use", 2, "llamatelemetry_demo._tile"),
        ("llamatelemetry_other.use", 6, "llamatelemetry_demo.kernels._kernel"),
    ]
    # The repository check fails on such modules (naming each place), unless each is an allowed exception.
    with pytest.raises(AssertionError, match=r"llamatelemetry_demo\.builds:3 imports llamatelemetry_demo"):
        assert_no_private_reaches(private_reaches(sources, packages))
    reasons = {(module, target): "planted" for module, _, target in found}
    assert_no_private_reaches(private_reaches(sources, packages), allowed=reasons)
    _write(demo, "llamatelemetry_demo.builds", "from llamatelemetry_demo._tile import tile\n")
    _write(other, "llamatelemetry_other.use", "from llamatelemetry_demo import kernels\n")
    assert list(private_reaches(*collect_sources([demo, other]))) == []
