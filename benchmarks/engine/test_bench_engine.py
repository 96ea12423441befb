"""pytest-benchmark timing of one decode step of the engine's model runner beside plain PyTorch, on one GPU.

Run on a GPU machine: ``pytest benchmarks/engine --benchmark-only`` (skipped without CUDA by the ``gpu`` marker).
A small Llama with random weights (8 layers, hidden 1024, 16 query heads over 4 KV heads, vocabulary 32000:
about 155M parameters, fp16) holds 16 sequences of 255 prompt tokens; each round is one decode step of all 16
through ``ModelRunner.step``, synchronized at the end, so host work (step metadata, copies) is included:

* ``engine``: every optimization on; the step replays the runner's captured CUDA graph for batch 16.
* ``torch``: the same weights with every flag off (``EngineFlags.all_off()``, fp16): plain PyTorch, a growing
  contiguous KV tensor per sequence, SDPA; its cache is put back to the prompt before each round (untimed), so
  every round computes the same step.

Each round writes the same KV slot again, so the context stays 256 tokens. GB/s count the weights and the KV
cache one step must read; ``pct_of_copy`` is how close the step comes to that roofline. Before timing, the graph
replay's logits are checked once against plain PyTorch's (the engine's GPU tests' fp16 model-level bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu

BATCH, PROMPT = 16, 255  # the decode token lands in the prompt's last block: the step's shape never changes
ATOL = RTOL = 2e-2  # fp16 rounding accumulates over the layers: a model-level bound, not the per-op table's


def small_llama() -> Any:
    from llamatelemetry_engine import PRESETS

    return PRESETS["tiny"].with_overrides(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=4,
        max_position_embeddings=2048,
    )  # fmt: skip


@dataclass
class Prefilled:
    """A runner holding the prompts, the decode step to time, its logits, and what puts the runner's cache back
    to the prompts after a step (``None`` for the paged cache, where a step rewrites the same slot)."""

    runner: Any
    step: Any
    logits: torch.Tensor
    restore: Callable[[], None] | None


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (PROMPT,), generator=gen).tolist() for _ in range(BATCH)]


def prefill(llm: Any, tokens: list[list[int]]) -> Prefilled:
    """Run the prompts through ``llm``'s runner, then one decode step of each sequence's greedy next token."""
    from llamatelemetry_core.serving import SequenceStep, StepInput

    runner, manager = llm.runner, llm.runner.block_manager
    tables: list[tuple[int, ...]] = []
    for seq_id, prompt in enumerate(tokens):
        if manager is not None:
            manager.allocate(seq_id, prompt)
        tables.append(tuple(manager.block_table(seq_id)) if manager is not None else ())
    first = runner.step(StepInput(tuple(SequenceStep(i, tuple(p), 0, tables[i]) for i, p in enumerate(tokens))))
    next_tokens = first.argmax(-1).tolist()
    step = StepInput(tuple(SequenceStep(i, (t,), PROMPT, tables[i]) for i, t in enumerate(next_tokens)))
    restore = None if manager is not None else contiguous_snapshot(runner)
    logits = runner.step(step)
    if restore is not None:
        restore()
    return Prefilled(runner, step, logits, restore)


def step_bytes(config: Any) -> int:
    """Weights (fp16) and the KV cache of every sequence that one decode step reads."""
    kv = BATCH * (PROMPT + 1) * config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    return int(config.num_parameters() * 2 + kv)


@pytest.fixture(scope="module")
def engines() -> tuple[Prefilled, Prefilled, Any]:
    from llamatelemetry_engine import LLM, EngineFlags, random_weights

    config = small_llama()
    loaded = random_weights(config, seed=0)
    tokens = prompts(config.vocab_size)
    fast = LLM(loaded, device="cuda", max_model_len=512, max_batch_size=BATCH, warmup=False)
    assert fast.flags.active("cuda_graphs") and fast.flags.active("paged_kv")
    plain = LLM(
        loaded, flags=EngineFlags.all_off(), device="cuda", dtype=torch.float16, max_model_len=512, warmup=False
    )
    ours, theirs = prefill(fast, tokens), prefill(plain, tokens)
    assert fast.runner.graphs is not None and fast.runner.graphs.captured, "the decode step did not replay a graph"
    ref = theirs.logits
    torch.testing.assert_close(ours.logits, ref, atol=ATOL * ref.abs().max().item(), rtol=RTOL)
    return ours, theirs, config


def contiguous_snapshot(runner: Any) -> Callable[[], None]:
    """What puts a runner's contiguous cache back to its state now (the prompts): a fresh store holding the same
    tensors, which a step's concatenation never changes."""
    from llamatelemetry_engine.context import ContiguousKVStore

    store = runner.store
    layers = store.num_layers
    saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for seq_id in range(BATCH):
        for layer in range(layers):
            k, v = store.append(seq_id, layer, *_empty_kv(runner))  # everything stored (appending nothing)
            saved[seq_id, layer] = (k, v)

    def setup() -> None:
        fresh = ContiguousKVStore(layers)
        for (seq_id, layer), (k, v) in saved.items():
            fresh.append(seq_id, layer, k, v)
        runner.store = fresh

    return setup


def _empty_kv(runner: Any) -> tuple[torch.Tensor, torch.Tensor]:
    c = runner.config
    empty = torch.empty(0, c.num_kv_heads, c.head_dim, device=runner.device, dtype=runner.flags.dtype)
    return empty, empty


@pytest.mark.parametrize("side", ["engine", "torch"])
def test_decode_step(gpu_bench: Any, engines: tuple[Prefilled, Prefilled, Any], side: str) -> None:
    ours, theirs, config = engines
    group = f"engine decode-step batch{BATCH} context{PROMPT + 1} fp16"
    if side == "engine":
        gpu_bench.synchronized(group, lambda: ours.runner.step(ours.step), moved_bytes=step_bytes(config))
    else:
        gpu_bench.synchronized(
            group, lambda: theirs.runner.step(theirs.step), setup=theirs.restore, moved_bytes=step_bytes(config)
        )
