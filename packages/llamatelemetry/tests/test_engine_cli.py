"""``llamatelemetry generate`` and ``llamatelemetry bench`` (the engine's commands)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from llamatelemetry.cli import main

pytest.importorskip("llamatelemetry_engine")


def test_generate_streams_tokens_and_reports_the_rate(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "5 17 99 3", "--token-ids", "--model", "random:tiny", "--device", "cpu", "--max-tokens", "5"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 5 and all(t.isdigit() for t in captured.out.split())
    assert "tokens/s" in captured.err and "4 prompt tokens" in captured.err
    # random weights come without a tokenizer: text prompts are refused with the reason
    assert main(["generate", "hello", "--model", "random:tiny", "--device", "cpu"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err


def test_generate_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["generate", "hi", "--model", str(tmp_path / "missing.gguf"), "--device", "cpu"]) == 2
    assert "missing weight file" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", "random:tiny", "--disable", "warp_drive", "--device", "cpu"]) == 2
    assert "unknown engine flag" in capsys.readouterr().err


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="timing loops under Triton's interpreter take minutes (70 s here); the cpu-fallback matrix runs them",
)
def test_bench_json_on_a_cpu(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "random:tiny", "--device", "cpu", "--quick", "--json", "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text(encoding="utf-8")) == report
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["cuda_graphs"]["status"] == "skipped" and rows["engine"]["status"] == "measured"
