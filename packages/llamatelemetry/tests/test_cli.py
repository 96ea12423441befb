from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

import llamatelemetry._environment as environment
from llamatelemetry._environment import measured_results, outside_tested_ranges
from llamatelemetry.cli import CPU_SUMMARY, SCHEMA_VERSION, _summary, doctor_report, main
from llamatelemetry_core.device import real_device_info, simulate_device
from llamatelemetry_core.environment import SDPA_NOT_PROBED
from llamatelemetry_core.toolchain import TESTED_RANGES

ROOT = Path(__file__).resolve().parents[3]


def test_doctor_json_reports_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("device", "tensor_cores", "triton", "flash_attn", "sdpa_backends", "operations", "components"):
        assert key in report
    assert report["schema_version"] == SCHEMA_VERSION == 3
    for key in ("driver", "packages", "environment_variables", "gpus", "summary", "outside_tested_ranges"):
        assert key in report
    assert set(report["driver"]) == {"nvidia_driver", "cuda_driver", "cuda_runtime"}
    assert set(report["packages"]) == {"triton", "transformers", "flash-attn", "numpy"}
    assert len(report["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    device = real_device_info()
    assert report["device"]["kind"] == device.kind
    assert report["device"]["name"] == device.name
    assert report["sdpa_backends"]["math"] is None
    assert report["components"]["llamatelemetry-core"]["imports"] is True
    assert report["simulated_device"] is None


def test_doctor_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "Tensor Cores:" in out and "Triton:" in out and "flash-attn:" in out and "SDPA backends:" in out
    assert "llamatelemetry-core: 0.1.0" in out


def test_doctor_simulating_a_t4(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json", "--simulate", "t4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["simulated_device"] == "t4"
    assert report["device"]["compute_capability"] == "7.5"
    assert report["device"]["architecture"] == "Turing"
    assert report["tensor_cores"] == {
        "present": True,
        "tf32": False,
        "bf16": False,
        "fp8": False,
        "tf32_matmul_enabled": report["tensor_cores"]["tf32_matmul_enabled"],
    }
    assert report["flash_attn"]["usable"] is False
    for op in report["operations"].values():
        assert op["dtype"] == "float16"


def test_doctor_rejects_an_unknown_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--simulate", "k80"]) == 2
    assert "expected a device to simulate" in capsys.readouterr().err


def test_report_operations_list_their_candidates() -> None:
    report = doctor_report()
    for op in report["operations"].values():
        names = [c["name"] for c in op["candidates"]]
        assert names[-1] == "reference"
        assert op["selected"] in names


def test_python_dash_m_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "llamatelemetry", "doctor", "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["llamatelemetry"]


def test_simulated_sdpa_says_not_probed_in_text_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json", "--simulate", "t4"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["sdpa_backends"].values()) == {SDPA_NOT_PROBED} == {"not probed (simulated)"}
    assert main(["doctor", "--simulate", "t4"]) == 0
    out = capsys.readouterr().out
    assert "SDPA backends: cudnn, flash, efficient, math: not probed (simulated)" in out
    assert "math no" not in out


@pytest.mark.parametrize("device", ["t4", "cpu", "cpu-bf16"])
def test_no_advice_to_install_what_cannot_run_here(device: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--simulate", device]) == 0
    out = capsys.readouterr().out
    flash_lines = [line for line in out.splitlines() if "flash-attn" in line or "flash_attn" in line]
    assert flash_lines and not any("pip install" in line for line in flash_lines), flash_lines
    status_lines = [line for line in out.splitlines() if line.startswith(("Triton:", "flash-attn:"))]
    assert len(status_lines) == 2
    assert not any("is not installed" in line for line in status_lines), status_lines  # "not installed" once


def test_advice_to_install_flash_attn_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    with simulate_device("a100"):
        report = doctor_report()
    assert report["flash_attn"]["reason"] == "install it with: pip install flash-attn --no-build-isolation"


def test_datasheet_line_names_only_the_figures_the_gpu_has(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--simulate", "t4"]) == 0
    datasheet = next(line for line in capsys.readouterr().out.splitlines() if "datasheet:" in line)
    assert "None" not in datasheet and "bf16" not in datasheet and "fp16 65 TFLOP/s" in datasheet


def test_cpu_summary_and_no_measured_ratios(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with simulate_device("cpu"):
        report = doctor_report()
    assert all(op["measured"] is None for op in report["operations"].values())
    # Other tests of this process may register operations with CPU implementations of their own.
    if all(op["selected"] in ("reference", "sdpa_cpu") for op in report["operations"].values()):
        assert report["summary"] == CPU_SUMMARY
    ops = {"layernorm": {"selected": "reference"}, "flash_attention": {"selected": "sdpa_cpu"}}
    with simulate_device("cpu") as cpu:
        assert (
            _summary(cpu, ops)
            == CPU_SUMMARY
            == ("every operation runs its PyTorch reference here; the speedups need a CUDA GPU")
        )
        ops["softmax"] = {"selected": "triton"}
        assert _summary(cpu, ops) == (
            "softmax (triton) run here (Triton's interpreter: for tests, slower than the references); every other "
            "operation runs its PyTorch reference; the speedups need a CUDA GPU"
        )


def test_measured_ratios_for_a_measured_gpu_model_and_not_for_others(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json", "--simulate", "h100"]) == 0
    h100 = json.loads(capsys.readouterr().out)
    if "triton" not in h100["operations"]["triton.layernorm"]["selected"]:
        pytest.skip("needs the Triton component and Triton installed (the cpu-triton matrix)")
    layernorm = h100["operations"]["triton.layernorm"]["measured"]
    assert layernorm["applies"] and layernorm["device"] == "NVIDIA H100 80GB HBM3"
    assert layernorm["source"].startswith("benchmarks/results/nvidia-h100-80gb-hbm3/")
    matmul = h100["operations"]["tensorcore.matmul"]["measured"]
    assert matmul["gpu_time"][0] < 1 < matmul["gpu_time"][1]  # the loss at 1024 is shown beside the gains
    assert h100["operations"]["triton.rope"]["measured"] is None
    assert "below 1x is a loss" in h100["summary"] and "not measured on this GPU" in h100["summary"]
    assert main(["doctor", "--simulate", "t4"]) == 0
    out = capsys.readouterr().out
    assert "softmax [float16]: triton (not measured on this GPU)" in out
    assert "none was measured on this GPU model" in out


def test_the_shipped_measurements_match_benchmarks_results(load_script: Callable[[str], ModuleType]) -> None:
    module = load_script("benchmark_summary")
    assert measured_results() == json.loads(module.render()), "run: python scripts/benchmark_summary.py"
    for gpu in measured_results()["gpus"].values():
        for operation in gpu["operations"].values():
            for source in operation["source"].split(", "):
                assert (ROOT / source).is_file()


def test_every_measured_operation_of_the_h200_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    # The fused matmul (its first table and the later split-K run) and paged attention were measured there:
    # doctor must not call them "not measured on this GPU", and the matmul's losses show beside its gains.
    assert main(["doctor", "--json", "--simulate", "h200"]) == 0
    h200 = json.loads(capsys.readouterr().out)
    matmul = h200["operations"]["tensorcore.matmul"]
    if matmul["selected"] != "fused":
        pytest.skip("needs the Triton component and Triton installed (the cpu-triton matrix)")
    measured = matmul["measured"]
    assert measured["applies"] and measured["device"] == "NVIDIA H200"
    assert measured["eager_calls"][0] < 1 < measured["gpu_time"][1]
    assert "tensorcore-fused-split-k/results.json" in measured["source"]
    shapes = {c["shape"]: c for c in measured["cases"]}
    assert shapes["1x4096x4096"]["gpu_time"] == 0.34  # the split-K run replaces the first table's 0.25
    paged = h200["operations"]["flashattn.paged_attention"]["measured"]
    assert paged["applies"] and paged["gpu_time"][0] > 1


def test_environment_variables_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMATELEMETRY_BACKEND", "reference")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("UNRELATED_VARIABLE", "x")
    env = doctor_report()["environment_variables"]
    assert env["LLAMATELEMETRY_BACKEND"] == "reference" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert "UNRELATED_VARIABLE" not in env


def test_versions_outside_the_declared_ranges_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = SimpleNamespace(
        metadata={"Name": "llamatelemetry-fake"},
        requires=[
            "torch<1.0",
            "torch>=2.0",
            "numpy<0.1; sys_platform == 'no-such-platform'",
            "no-such-distribution-xyz>=1",
            'transformers<0.1; extra == "transformers"',
        ],
    )
    monkeypatch.setattr(environment, "_installed_llamatelemetry", lambda: [fake])
    found = outside_tested_ranges()
    torch_version = importlib.metadata.version("torch")
    expected = [{"distribution": "llamatelemetry-fake", "requirement": "torch<1.0", "installed": torch_version}]
    if importlib.util.find_spec("transformers") is not None:
        transformers = importlib.metadata.version("transformers")
        expected.append(
            {
                "distribution": "llamatelemetry-fake",
                "requirement": 'transformers<0.1; extra == "transformers"',
                "installed": transformers,
            }
        )
    assert found == expected


def test_torch_outside_the_tested_range_is_reported_without_any_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    # Sources on the path by hand: no distribution declares anything, and the tested ranges still apply.
    monkeypatch.setattr(environment, "_installed_llamatelemetry", list)
    assert outside_tested_ranges() == []
    monkeypatch.setitem(TESTED_RANGES, "torch", ">=99")
    torch_version = importlib.metadata.version("torch")
    expected = {"distribution": "llamatelemetry-core", "requirement": "torch>=99", "installed": torch_version}
    assert outside_tested_ranges() == [expected]
    report = doctor_report()
    assert report["outside_tested_ranges"] == [expected]


def test_help_shows_no_rest_markup(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_an_unknown_flag_of_doctor_is_reported_under_doctors_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["doctor", "--bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: llamatelemetry doctor" in err and "unrecognized arguments: --bogus" in err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_output_is_reported_once_without_a_traceback() -> None:
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "llamatelemetry", "doctor", "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            timeout=300,
        )
    assert proc.returncode == 1
    assert "cannot write the report" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("simulate", [[], ["--simulate", "t4"], ["--simulate", "cpu"]])
def test_human_output_never_prints_none(
    simulate: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without package metadata (sources put on the path by hand) the versions come from the modules themselves;
    # a CPU build of torch has no CUDA or cuDNN version, which is said in words.
    monkeypatch.setattr("llamatelemetry.cli.distribution_version", lambda name: None)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert main(["doctor", *simulate]) == 0
    out = capsys.readouterr().out
    assert "None" not in out
    assert "CPU build: no CUDA, no cuDNN" in out
    assert "llamatelemetry-core: 0.1.0" in out and "llamatelemetry-triton: 0.1.0 -> " in out


@pytest.mark.parametrize("simulate", [[], ["--simulate", "t4"], ["--simulate", "a100"], ["--simulate", "cpu"]])
def test_no_line_says_not_installed_twice(
    simulate: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # flash-attn absent everywhere (and Triton too in the cpu-fallback matrix): each reason is said once, not
    # wrapped in another "not installed (...)".
    monkeypatch.setitem(sys.modules, "flash_attn", None)
    assert main(["doctor", *simulate]) == 0
    for line in capsys.readouterr().out.splitlines():
        assert re.search(r"not installed[^,;]*not installed", line) is None, line
        assert "((" not in line and "))" not in line, line


def test_every_gpu_and_the_driver_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two GPUs and a driver, as collect_env reports them: the driver from nvidia-smi, every GPU by index.
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 550.54.15\necho 550.54.15\n", encoding="utf-8")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    assert environment.driver_versions()["nvidia_driver"] == "550.54.15"
    with simulate_device("h100") as h100, simulate_device("a100") as a100:
        gpus = [{**h100.to_dict(), "index": 0}, {**a100.to_dict(), "index": 1}]
    monkeypatch.setattr("llamatelemetry.cli.visible_gpus", lambda: gpus)
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [g["index"] for g in report["gpus"]] == [0, 1]
    assert report["driver"]["nvidia_driver"] == "550.54.15"
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA driver 550.54.15" in out
    if torch.cuda.is_available():  # the current GPU (the real one, index 0) has its own line; the others follow
        assert f"GPU 0: {torch.cuda.get_device_name(0)}" in out
        assert "other GPUs of this machine:\n  GPU 1: NVIDIA A100" in out and "GPU 0: NVIDIA H100" not in out
    else:
        assert "  GPU 0: NVIDIA H100" in out and "  GPU 1: NVIDIA A100" in out
