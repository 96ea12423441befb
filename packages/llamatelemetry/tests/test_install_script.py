"""The from-clone install recipe (``scripts/install.py``): the pip commands it runs (the build session runs them)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from llamatelemetry_core.toolchain import TESTED_RANGES

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def install(load_script: Callable[[str], ModuleType]) -> ModuleType:
    return load_script("install")


def _editable_targets(command: list[str]) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == "--editable"]


def test_one_component_brings_core_and_the_meta_package_from_the_clone(install: ModuleType) -> None:
    (command,) = install.pip_commands(["triton"], extras=[], torch_cpu=False, no_deps=False)
    assert command[:4] == [sys.executable, "-m", "pip", "install"]
    packages = ROOT / "packages"
    assert _editable_targets(command) == [
        str(packages / "llamatelemetry-core"),
        str(packages / "llamatelemetry"),
        str(packages / "llamatelemetry-triton"),
    ]


def test_all_means_every_component_folder_of_the_clone(install: ModuleType) -> None:
    folders = sorted(p.name for p in (ROOT / "packages").glob("llamatelemetry-*") if p.name != "llamatelemetry-core")
    assert install.components() == [f.removeprefix("llamatelemetry-") for f in folders]
    (command,) = install.pip_commands(["all"], extras=[], torch_cpu=False, no_deps=True)
    assert "--no-deps" in command
    assert sorted(Path(t).name for t in _editable_targets(command)[2:]) == folders


def test_cpu_torch_first_and_extras_on_their_component(install: ModuleType) -> None:
    torch_cpu, packages = install.pip_commands(
        ["graphs"], extras=["flashattn:transformers"], torch_cpu=True, no_deps=False
    )
    # The CPU build within the tested range: an unbounded torch from the CPU index could be newer than the
    # packages allow, and their requirement would then fetch a CUDA build from the default index.
    assert torch_cpu[-3:] == [f"torch{TESTED_RANGES['torch']}", "--index-url", "https://download.pytorch.org/whl/cpu"]
    assert _editable_targets(packages)[2:] == [
        f"{ROOT / 'packages' / 'llamatelemetry-flashattn'}[transformers]",
        str(ROOT / "packages" / "llamatelemetry-graphs"),
    ]


def test_regular_installs_on_request(install: ModuleType) -> None:
    (command,) = install.pip_commands(["graphs"], extras=[], torch_cpu=False, no_deps=False, editable=False)
    assert "--editable" not in command and command[-1] == str(ROOT / "packages" / "llamatelemetry-graphs")


@pytest.mark.parametrize(
    ("components", "extras", "message"),
    [
        (["tritonn"], [], r"unknown components \['tritonn'\]; choose among all, batch"),
        (["graphs"], ["transformers"], "expected --extra COMPONENT:EXTRA"),
        (["graphs"], ["nope:x"], "expected --extra COMPONENT:EXTRA"),
    ],
)
def test_bad_requests_say_what_is_known(
    install: ModuleType, components: list[str], extras: list[str], message: str
) -> None:
    with pytest.raises(SystemExit, match=message):
        install.pip_commands(components, extras=extras, torch_cpu=False, no_deps=False)


def test_dry_run_prints_and_runs_nothing(install: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert install.main(["triton", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("+ ") and "pip install --editable" in out and "llamatelemetry-triton" in out
