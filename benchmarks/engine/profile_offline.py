"""How busy the GPU is under continuous and static batching, on one CUDA GPU.

Usage (from the repository root, no installs):

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python benchmarks/engine/profile_offline.py [--requests 64]

Random weights in the shape of Llama-3.2-1B (fp16); the first ``--requests`` requests of the offline workload of
``bench_engine.py`` (lengths uniform in 100..1024, seed 0), maximum batch 64. For each schedule, after one untimed
pass: the wall time of a pass, and the device time of every kernel of another pass under ``torch.profiler``.
Their ratio is the share of the wall time the GPU was busy; the rest is host work the GPU waited for. With 64
requests both schedules run one batch, the same kernels, so the difference is host time alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine as be

from llamatelemetry_engine import PRESETS, SamplingParams, random_weights
from llamatelemetry_engine.loader import LoadedModel


def profile_schedule(loaded: LoadedModel, continuous: bool, ps: list[list[int]], params: list[SamplingParams]) -> None:
    """Print one schedule's wall time, busy share and heaviest kernels."""
    llm = be.offline_llm(loaded, continuous, 64)
    llm.generate(ps, params)
    wall = be.timed(lambda: llm.generate(ps, params))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(ps, params)
        torch.cuda.synchronize()
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6
    name = "continuous" if continuous else "static"
    print(f"{name}: wall {wall:.3f} s, kernel time {busy:.3f} s ({busy / wall:.0%} busy)")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:8]:
        print(f"   {e.self_device_time_total / 1e3:9.1f} ms  {e.count:7d}  {e.key[:90]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=64, help="requests of the offline workload (default 64)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_offline: needs a CUDA GPU", file=sys.stderr)
        return 2
    loaded = random_weights(PRESETS["llama-3.2-1b"], seed=0, dtype=torch.float16)
    ps, params = be.offline_requests(loaded, args.requests)
    for name in ("continuous", "static"):
        profile_schedule(loaded, name == "continuous", ps, params)
        be.free_memory()
    return 0


if __name__ == "__main__":
    sys.exit(main())
