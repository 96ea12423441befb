"""Check what an installation of llamatelemetry wheels provides (run by the ``build`` nox session).

    python scripts/check_install.py --installed graphs,kvcache
    python scripts/check_install.py --installed triton --from-clone   # after scripts/install.py triton

Every documented module of an installed component must import; every other one must fail with an
``ImportError`` that names the command installing it: the pip extra after an install from a package index (or
wheels), the clone's ``scripts/install.py`` after an install from the clone (``--from-clone``). Then
``llamatelemetry doctor --json`` must run and list the same components as installed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

DOCUMENTED = {
    "graphs": "llamatelemetry.cuda.graphs",
    "triton": "llamatelemetry.cuda.triton_kernels",
    "tensorcore": "llamatelemetry.cuda.tensor_core",
    "flashattn": "llamatelemetry.inference.flash_attn",
    "kvcache": "llamatelemetry.inference.kv_cache",
    "batch": "llamatelemetry.inference.batch",
    "engine": "llamatelemetry.engine",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--installed", default="", help="comma-separated extras expected to be installed")
    parser.add_argument("--from-clone", action="store_true", help="the packages were installed from this clone")
    args = parser.parse_args()
    installed = {e for e in args.installed.split(",") if e}
    unknown = installed - DOCUMENTED.keys()
    if unknown:
        print(f"unknown extras {sorted(unknown)}; known: {sorted(DOCUMENTED)}", file=sys.stderr)
        return 2

    def hint(extra: str) -> str:
        return f"scripts/install.py {extra}" if args.from_clone else f'pip install "llamatelemetry[{extra}]"'

    problems: list[str] = []
    for extra, path in DOCUMENTED.items():
        try:
            importlib.import_module(path)
        except ImportError as exc:
            if extra in installed:
                problems.append(f"{path} should import, got: {exc}")
            elif hint(extra) not in str(exc):
                problems.append(f"{path} fails without naming {hint(extra)!r}: {exc}")
            else:
                print(f"ok: {path} is missing and names {hint(extra)!r}")
        else:
            if extra in installed:
                print(f"ok: {path} imports")
            else:
                problems.append(f"{path} imports although llamatelemetry[{extra}] was not installed")
    # The console script of this interpreter's environment, activated or not.
    script = shutil.which("llamatelemetry", path=os.pathsep.join([str(Path(sys.executable).parent), os.defpath]))
    proc = subprocess.run([script or "llamatelemetry", "doctor", "--json"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        problems.append(f"llamatelemetry doctor --json exited {proc.returncode}: {proc.stderr.strip()}")
    else:
        report = json.loads(proc.stdout)
        imported = {c["extra"] for c in report["components"].values() if c.get("extra") and c["imports"]}
        if imported != installed:
            problems.append(f"doctor lists {sorted(imported)} as installed, expected {sorted(installed)}")
        else:
            print(f"ok: llamatelemetry doctor --json runs on {report['device']['name']}")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
