"""Create a new distribution ``packages/llamatelemetry-NAME`` with everything the repository's rules ask for.

    python scripts/new_package.py NAME "One line saying what it does"

It writes the pyproject (hatchling, the tested torch range, llamatelemetry-core as its one sibling dependency),
README, CHANGELOG, LICENSE, ``src/llamatelemetry_NAME/{__init__,__about__}.py``, ``py.typed`` and a first test.
Nothing else needs editing for the tools to see it: ``scripts/run_matrix.py`` and the noxfile list ``packages/``,
ruff treats ``llamatelemetry*`` as first-party. The layout test then asks for what a component still needs by
hand: an extra of the meta-package and an entry in its component table (``llamatelemetry/_components.py``).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _torch_range() -> str:
    source = (ROOT / "packages" / "llamatelemetry-core" / "src" / "llamatelemetry_core" / "toolchain.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "TESTED_RANGES":
            assert node.value is not None
            ranges: dict[str, str] = ast.literal_eval(node.value)
            return ranges["torch"]
    raise RuntimeError("TESTED_RANGES not found in llamatelemetry_core/toolchain.py")


def files(name: str, description: str) -> dict[str, str]:
    """The files of the new package, relative to its folder."""
    dist, module = f"llamatelemetry-{name}", f"llamatelemetry_{name}"
    return {
        "pyproject.toml": f"""[build-system]
requires = ["hatchling>=1.21"]
build-backend = "hatchling.build"

[project]
name = "{dist}"
dynamic = ["version"]
description = "llamatelemetry: {description}"
readme = "README.md"
requires-python = ">=3.10"
license = "Apache-2.0"
dependencies = [
    "llamatelemetry-core>=0.1,<0.2",
    "torch{_torch_range()}",
]
classifiers = [
    "Programming Language :: Python :: 3",
    "Topic :: Scientific/Engineering :: Artificial Intelligence",
    "Typing :: Typed",
]

[tool.hatch.version]
path = "src/{module}/__about__.py"

[tool.hatch.build.targets.wheel]
packages = ["src/{module}"]
""",
        "README.md": f"# {dist}\n\n{description}\n\nPart of llamatelemetry: https://github.com/llamatelemetry\n",
        "CHANGELOG.md": f"# Changelog of {dist}\n\n## 0.1.0 (unreleased)\n\n- First version.\n",
        "LICENSE": (ROOT / "LICENSE").read_text(encoding="utf-8"),
        f"src/{module}/__about__.py": '__version__ = "0.1.0"\n',
        f"src/{module}/__init__.py": f'"""{description}"""\n\nfrom {module}.__about__ import __version__\n\n'
        '__all__ = ["__version__"]\n',
        f"src/{module}/py.typed": "",
        "tests/test_package.py": f"""from __future__ import annotations

import importlib.metadata

import {module}


def test_installed_version_matches_the_package() -> None:
    assert {module}.__version__ == importlib.metadata.version("{dist}")
""",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="short name: lower case letters and digits (the package is llamatelemetry-NAME)")
    parser.add_argument("description", help="one line saying what the package does")
    parser.add_argument("--root", type=Path, default=ROOT / "packages", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[a-z][a-z0-9]*", args.name):
        print(f"new_package: expected a name of lower-case letters and digits, got {args.name!r}", file=sys.stderr)
        return 2
    target = args.root / f"llamatelemetry-{args.name}"
    if target.exists():
        print(f"new_package: {target} exists already; choose another name", file=sys.stderr)
        return 2
    for relative, text in files(args.name, args.description).items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(f"created {target}; add an extra '{args.name}' to packages/llamatelemetry/pyproject.toml and an entry to")
    print("packages/llamatelemetry/src/llamatelemetry/_components.py (tests/test_layout.py checks both)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
