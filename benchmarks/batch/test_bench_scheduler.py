"""pytest-benchmark timings of the continuous-batching scheduler's host work per step (CPU; no GPU needed).

Run: ``pytest benchmarks/batch --benchmark-only``. The workloads are those of ``bench_scheduler.py`` (loaded
from this directory), which also writes the per-machine results and checks the 0.5 ms target: 256 sequences
decoding with 1000 waiting, and the protocol floor (building the step's ``SequenceStep`` objects) as baseline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from llamatelemetry_batch.serving import SimpleBlockManager, TokenBudget
from llamatelemetry_core.serving import KVBlockManager, SequenceStep, StepInput


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_scheduler", Path(__file__).with_name("bench_scheduler.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _load_bench()
# Room for the warm-up and every round pytest-benchmark may run (each step adds a token per sequence).
_BLOCKS = (BENCH.RUNNING + 8) * (1024 + 20_000) // BENCH.PAGE_SIZE


@pytest.mark.parametrize(
    "manager",
    [
        pytest.param(lambda: SimpleBlockManager(_BLOCKS, BENCH.PAGE_SIZE), id="paged"),
        pytest.param(lambda: TokenBudget(_BLOCKS * BENCH.PAGE_SIZE), id="unpaged"),
    ],
)
def test_scheduler_step_256_running_1000_waiting(benchmark: Any, manager: Any) -> None:
    block_manager: KVBlockManager = manager()
    scheduler = BENCH.steady_scheduler(block_manager, paged=isinstance(block_manager, SimpleBlockManager))
    benchmark.pedantic(BENCH._advance, args=(scheduler,), rounds=2000, warmup_rounds=20)
    assert scheduler.num_running == BENCH.RUNNING and scheduler.num_waiting == BENCH.WAITING


def test_protocol_floor_256_sequence_steps(benchmark: Any) -> None:
    scheduler = BENCH.steady_scheduler(SimpleBlockManager(_BLOCKS, BENCH.PAGE_SIZE), paged=True)
    ready = [(s.seq_id, s.token_ids[-1], s.num_tokens - 1, tuple(s.block_table)) for s in scheduler.running]

    def floor() -> StepInput:
        return StepInput(tuple(SequenceStep(i, (t,), p, b, True) for i, t, p, b in ready))

    step = benchmark(floor)
    assert len(step.sequences) == BENCH.RUNNING
