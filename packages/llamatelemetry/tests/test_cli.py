from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llamatelemetry.cli import doctor_report, main
from llamatelemetry_core.device import real_device_info


def test_doctor_json_reports_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("device", "tensor_cores", "triton", "flash_attn", "sdpa_backends", "operations", "components"):
        assert key in report
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
