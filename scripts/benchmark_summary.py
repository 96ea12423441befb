"""Summarize ``benchmarks/results/`` into the measured ratios ``llamatelemetry doctor`` reports.

    python scripts/benchmark_summary.py           # rewrite packages/llamatelemetry/src/llamatelemetry/measured.json
    python scripts/benchmark_summary.py --check   # exit 1 when that file is out of date

The results are not installed with the packages, so the meta-package ships this small summary: per GPU model
(the key of ``llamatelemetry_core.gpu_specs``) and per operation, the ratio of PyTorch's time to ours in the
same run (above 1: ours is faster), per measured shape, for GPU time (the call replayed, no host work) and,
where measured, for eager calls (host work included). A test keeps the file in sync with the results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET = ROOT / "packages" / "llamatelemetry" / "src" / "llamatelemetry" / "measured.json"
SCHEMA_VERSION = 1

sys.path.insert(0, str(ROOT / "packages" / "llamatelemetry-core" / "src"))
from llamatelemetry_core.gpu_specs import find_spec  # noqa: E402

# Triton benchmark: case -> (operation, PyTorch baseline implementation as named in the results).
_TRITON_CASES = {
    "layernorm": ("layernorm", "torch eager (F.layer_norm)"),
    "rmsnorm": ("rmsnorm", "torch eager (reference)"),
    "add": ("add", "torch eager"),
    "softmax": ("softmax", "torch eager (torch.softmax)"),
    "fused add+rmsnorm": ("fused_add_rmsnorm", "torch eager unfused (HF LlamaRMSNorm)"),
}


def _ratio(baseline_ms: float | None, ours_ms: float | None) -> float | None:
    if not baseline_ms or not ours_ms:
        return None
    return round(baseline_ms / ours_ms, 2)


def _operation(implementation: str, baseline: str, source: Path, cases: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "implementation": implementation,
        "baseline": baseline,
        "source": source.relative_to(ROOT).as_posix(),
        "cases": cases,
    }


def _triton(path: Path) -> dict[str, dict[str, Any]]:
    timings = json.loads(path.read_text(encoding="utf-8"))["timings"]
    by_key = {(t["case"], t["shape"], t["impl"]): t for t in timings}
    operations: dict[str, dict[str, Any]] = {}
    for case, (operation, baseline) in _TRITON_CASES.items():
        cases = []
        for (c, shape, impl), ours in by_key.items():
            base = by_key.get((c, shape, baseline))
            if c != case or impl != "triton" or base is None:
                continue
            cases.append(
                {
                    "shape": shape,
                    "gpu_time": _ratio(base["ms"], ours["ms"]),
                    "eager_calls": _ratio(base.get("eager_ms"), ours.get("eager_ms")),
                }
            )
        if cases:
            operations[operation] = _operation("triton", baseline, path, cases)
    return operations


def _tensorcore(path: Path) -> dict[str, dict[str, Any]]:
    matmul = json.loads(path.read_text(encoding="utf-8"))["matmul"]
    cases = [
        {"shape": f"{m['size']}x{m['size']}", "gpu_time": round(m["ratio"], 2), "eager_calls": None} for m in matmul
    ]
    baseline = "torch.matmul in fp32 with TF32 off (fp32 in and out)"
    return {"matmul_tensor_core": _operation("tensor_core", baseline, path, cases)}


def _flashattn(path: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    cases = []
    for row in [*data["prefill"], data["decode"]]:
        ms = row["ms"]
        sdpa = {k: v for k, v in ms.items() if k.startswith("sdpa_") and k != "sdpa_math" and v}
        fastest = min(sdpa, key=sdpa.__getitem__)
        cases.append({"shape": f"{row['shape']} (vs {fastest})", "gpu_time": _ratio(sdpa[fastest], ms["auto"])})
        cases[-1]["eager_calls"] = None
    baseline = "the fastest of PyTorch's SDPA backends in the same run"
    return {"flash_attention": _operation("automatic choice", baseline, path, cases)}


def _tensorcore_fused(path: Path) -> dict[str, dict[str, Any]]:
    """``bench_tensorcore``'s fused-path tables: per product, the automatic choice called eagerly and replayed
    from a CUDA graph, each against fp32 ``torch.matmul`` timed the same way."""
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    by_shape: dict[str, dict[str, Any]] = {}
    for row in rows:
        name = str(row["name"])
        if not name.startswith("automatic (") or row.get("ratio") is None:
            continue
        case = by_shape.setdefault(row["group"], {"shape": row["group"], "gpu_time": None, "eager_calls": None})
        case["gpu_time" if name.endswith("graph replay") else "eager_calls"] = round(row["ratio"], 2)
    baseline = "torch.matmul in fp32 with TF32 off (fp32 in and out)"
    if not by_shape:
        return {}
    return {"matmul_tensor_core": _operation("automatic choice", baseline, path, list(by_shape.values()))}


def _flashattn_paged(path: Path) -> dict[str, dict[str, Any]]:
    """``bench_paged_attention``'s decode steps against gathering the pages and calling SDPA (both replayed)."""
    decode = json.loads(path.read_text(encoding="utf-8"))["decode"]
    cases = [
        {"shape": row["case"], "gpu_time": round(row["vs_gather_sdpa"], 2), "eager_calls": None}
        for row in decode
        if row.get("vs_gather_sdpa")
    ]
    baseline = "gathering the pages, then PyTorch's SDPA"
    return {"paged_attention": _operation("automatic choice", baseline, path, cases)} if cases else {}


# Read in this order; a later file's cases of the same operation and implementation replace the earlier ones of
# the same shape (a newer run of some products: the fused matmul's split-K run after its first table).
_READERS = {
    "triton": _triton,
    "tensorcore": _tensorcore,
    "tensorcore-fused": _tensorcore_fused,
    "tensorcore-fused-split-k": _tensorcore_fused,
    "flashattn": _flashattn,
    "flashattn-paged": _flashattn_paged,
}


def _merge(operations: dict[str, Any], found: dict[str, dict[str, Any]]) -> None:
    for name, entry in found.items():
        earlier = operations.get(name)
        if earlier is None or earlier["implementation"] != entry["implementation"]:
            operations[name] = entry
            continue
        cases = {c["shape"]: c for c in earlier["cases"]}
        cases.update({c["shape"]: c for c in entry["cases"]})
        sources = earlier["source"].split(", ")
        if entry["source"] not in sources:
            sources.append(entry["source"])
        operations[name] = {**earlier, "cases": list(cases.values()), "source": ", ".join(sources)}


def _device_name(gpu_dir: Path) -> tuple[str, float | None]:
    for component in _READERS:
        path = gpu_dir / component / "results.json"
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if "device" in data and isinstance(data["device"], dict):
                return str(data["device"]["name"]), data["device"].get("memory_gib")
            if "environment" in data:
                return str(data["environment"]["device"]), None
            return str(data["benchmark"]["environment"]["device"]), None
    raise SystemExit(f"benchmark_summary: no results.json under {gpu_dir}")


def summary() -> dict[str, Any]:
    """The summary of every GPU under ``benchmarks/results/`` (pure: reads files, writes nothing)."""
    gpus: dict[str, Any] = {}
    for gpu_dir in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        if not any((gpu_dir / component / "results.json").is_file() for component in _READERS):
            continue  # no GPU operation measured there (CPU-only results, such as batch inference's)
        name, memory = _device_name(gpu_dir)
        spec = find_spec(name, memory)
        if spec is None:
            raise SystemExit(f"benchmark_summary: {name} (from {gpu_dir}) is not in llamatelemetry_core.gpu_specs")
        operations: dict[str, Any] = {}
        for component, read in _READERS.items():
            path = gpu_dir / component / "results.json"
            if path.is_file():
                _merge(operations, read(path))
        gpus[spec.key] = {"device": name, "results": gpu_dir.relative_to(ROOT).as_posix(), "operations": operations}
    return {"schema_version": SCHEMA_VERSION, "gpus": gpus}


def render() -> str:
    return json.dumps(summary(), indent=1, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail when the shipped summary is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not TARGET.is_file() or TARGET.read_text(encoding="utf-8") != text:
            print(
                f"{TARGET.relative_to(ROOT)} is out of date: run python scripts/benchmark_summary.py", file=sys.stderr
            )
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
