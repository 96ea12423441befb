"""Install llamatelemetry from this clone: the chosen components, editable, their siblings taken from the clone.

    python scripts/install.py triton flashattn      # core, the meta-package and two components
    python scripts/install.py all                   # every component
    python scripts/install.py all --torch-cpu       # first the CPU build of torch (no GPU here)
    python scripts/install.py graphs --dry-run      # print the pip commands only

The packages are not on a package index, so ``pip install "llamatelemetry[triton]"`` cannot find
``llamatelemetry-triton``. This script hands pip every local package it needs in one command
(``pip install -e packages/llamatelemetry-core -e packages/llamatelemetry -e packages/llamatelemetry-triton``),
so that each sibling requirement (``llamatelemetry-core>=0.1,<0.2``) is met by the folder next to it, and only
third-party packages (torch, Triton, ...) come from the index. Component names are the folders
``packages/llamatelemetry-<name>``; ``--extra`` adds an optional dependency of a component
(``--extra flashattn:transformers``). Runs the pip of the Python that runs it.
"""

from __future__ import annotations

import argparse
import ast
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ROOT / "packages"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
TOOLCHAIN = PACKAGES / "llamatelemetry-core" / "src" / "llamatelemetry_core" / "toolchain.py"


def torch_requirement() -> str:
    """``torch`` with the tested range of ``llamatelemetry_core.toolchain.TESTED_RANGES`` (read, not imported:
    torch may not be installed yet). Unbounded, the CPU index would serve its newest torch, and the packages'
    own ``torch`` requirement would then pull a CUDA build from the default index to replace it."""
    for node in ast.parse(TOOLCHAIN.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "TESTED_RANGES":
            assert node.value is not None
            ranges: dict[str, str] = ast.literal_eval(node.value)
            return f"torch{ranges['torch']}"
    raise SystemExit(f"install.py: TESTED_RANGES not found in {TOOLCHAIN}")


def components() -> list[str]:
    """The components of this clone: every ``packages/llamatelemetry-<name>`` except core."""
    names = [p.name.removeprefix("llamatelemetry-") for p in PACKAGES.glob("llamatelemetry-*") if p.is_dir()]
    return sorted(n for n in names if n != "core" and (PACKAGES / f"llamatelemetry-{n}" / "pyproject.toml").is_file())


def pip_commands(
    chosen: list[str], *, extras: list[str], torch_cpu: bool, no_deps: bool, editable: bool = True
) -> list[list[str]]:
    """The pip commands that install ``chosen`` (``["all"]`` for every component) from this clone."""
    known = components()
    wanted = known if "all" in chosen else chosen
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise SystemExit(f"install.py: unknown components {unknown}; choose among {', '.join(['all', *known])}")
    by_component: dict[str, list[str]] = {c: [] for c in wanted}
    for item in extras:
        component, sep, extra = item.partition(":")
        if not sep or not extra or component not in known:
            raise SystemExit(f"install.py: expected --extra COMPONENT:EXTRA with a component of {known}, got {item!r}")
        by_component.setdefault(component, []).append(extra)
    pip = [sys.executable, "-m", "pip", "install"]
    commands: list[list[str]] = []
    if torch_cpu:
        # Before the packages: their "torch" requirement is then already met by the CPU build.
        commands.append([*pip, torch_requirement(), "--index-url", TORCH_CPU_INDEX])
    targets = [str(PACKAGES / "llamatelemetry-core"), str(PACKAGES / "llamatelemetry")]
    for component, component_extras in sorted(by_component.items()):
        suffix = f"[{','.join(sorted(set(component_extras)))}]" if component_extras else ""
        targets.append(f"{PACKAGES / f'llamatelemetry-{component}'}{suffix}")
    args = [arg for target in targets for arg in (["--editable", target] if editable else [target])]
    commands.append([*pip, *(["--no-deps"] if no_deps else []), *args])
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Install llamatelemetry components from this clone, editable, siblings resolved locally."
    )
    parser.add_argument(
        "components", nargs="*", metavar="COMPONENT", help=f"all, or some of: {', '.join(components())}"
    )
    parser.add_argument("--extra", action="append", default=[], metavar="COMPONENT:EXTRA", help="an optional extra")
    parser.add_argument("--torch-cpu", action="store_true", help=f"install torch from {TORCH_CPU_INDEX} first")
    parser.add_argument("--no-deps", action="store_true", help="install our packages only, no third-party ones")
    parser.add_argument("--no-editable", action="store_true", help="regular installs of the folders")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands, run nothing")
    args = parser.parse_args(argv)
    commands = pip_commands(
        args.components,
        extras=args.extra,
        torch_cpu=args.torch_cpu,
        no_deps=args.no_deps,
        editable=not args.no_editable,
    )
    for command in commands:
        print("+ " + " ".join(shlex.quote(part) for part in command), flush=True)
        if not args.dry_run:
            code = subprocess.run(command, check=False).returncode
            if code != 0:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
