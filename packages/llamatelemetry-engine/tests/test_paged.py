"""The paged path: chunked prefill, prefix reuse, padded decode graphs, and requests the cache can never hold."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.selection import BackendFallbackWarning
from llamatelemetry_engine import (
    LLM,
    PRESETS,
    EngineFlags,
    RequestTooLargeError,
    SamplingParams,
    random_weights,
)
from llamatelemetry_engine.graphs import DecodeGraphs, StepGraphs
from llamatelemetry_engine.loader import LoadedModel

TINY = PRESETS["tiny"]
Greedy = Callable[[torch.nn.Module, list[int], int], list[int]]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return random_weights(TINY, seed=9)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(4)
    shared = torch.randint(3, 250, (35,), generator=gen).tolist()
    return [[*shared, 7, 8], shared[:20], torch.randint(3, 250, (5,), generator=gen).tolist()]


# Prefill chunks over cached prefix blocks through the kernels: once, with continuous batching.
@pytest.mark.parametrize("continuous", [pytest.param(True, marks=pytest.mark.kernel_paths), False])
def test_chunked_prefill_and_prefix_reuse_keep_the_tokens(
    continuous: bool,
    loaded: LoadedModel,
    prompts: list[list[int]],
    hf_reference: Callable[[LoadedModel], torch.nn.Module],
    greedy: Greedy,
) -> None:
    expected = [greedy(hf_reference(loaded), p, 6) for p in prompts]
    flags = EngineFlags() if continuous else EngineFlags().without("continuous_batching")
    llm = LLM(loaded, flags=flags, device="cpu", max_num_batched_tokens=8, page_size=4, max_model_len=64)
    assert llm.runner.page_size == 4 and llm.flags.active("paged_kv")
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected
    bm = llm.runner.block_manager
    assert bm is not None
    before = bm.stats().prefix_hit_tokens
    assert [c.token_ids for c in llm.generate(prompts, params)] == expected  # now from cached prefix blocks
    assert bm.stats().prefix_hit_tokens > before


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU emulation of graphs only; with CUDA, capture refuses CPU tensors"
)
def test_padded_decode_graphs_give_the_eager_logits(loaded: LoadedModel, prompts: list[list[int]]) -> None:
    # Without CUDA, llamatelemetry-graphs replays by re-running the step eagerly: this checks the padding to the
    # bucket (slot PAD_SLOT, length 0) and the static buffers; the GPU tests capture real graphs.
    flags = EngineFlags().without("continuous_batching")
    eager = LLM(loaded, flags=flags, device="cpu", max_model_len=64, max_batch_size=4)
    graphed = LLM(loaded, flags=flags, device="cpu", max_model_len=64, max_batch_size=4)
    graphed.runner.graphs = DecodeGraphs(graphed.runner, 4)
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    got = [c.token_ids for c in graphed.generate(prompts, params)]
    assert got == [c.token_ids for c in eager.generate(prompts, params)]
    assert graphed.runner.graphs.captured and graphed.runner.graphs.buckets.replays >= 4


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU emulation of graphs only; with CUDA, capture refuses CPU tensors"
)
@pytest.mark.parametrize("flash", [True, False])
def test_step_graphs_give_the_eager_tokens_with_chunks_and_mixed_steps(
    loaded: LoadedModel, prompts: list[list[int]], flash: bool
) -> None:
    # Steps that carry prompt chunks beside decodes replay token-count graphs (emulated without CUDA): padding
    # to the bucket, the extra padding sequence and the logits rows must leave every token as the eager one.
    flags = EngineFlags() if flash else EngineFlags().without("flash_attention")
    kwargs = {"device": "cpu", "max_model_len": 64, "max_batch_size": 2, "max_num_batched_tokens": 8, "page_size": 4}
    eager = LLM(loaded, flags=flags, **kwargs)  # type: ignore[arg-type]
    graphed = LLM(loaded, flags=flags, **kwargs)  # type: ignore[arg-type]
    runner = graphed.runner
    runner.step_graphs = StepGraphs(runner, 2, 8, smallest=4)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    many = [prompts[0][:13], prompts[1][:11], prompts[2]]  # chunks of 8 beside decodes, a shared prefix
    assert [c.token_ids for c in graphed.generate(many, params)] == [c.token_ids for c in eager.generate(many, params)]
    assert runner.step_graphs.sizes == [4, 8] and runner.step_graphs.replays > 0


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU emulation of graphs only; with CUDA, capture refuses CPU tensors"
)
def test_a_failed_step_graph_capture_warns_once_and_runs_those_steps_eagerly(
    loaded: LoadedModel, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs = {"device": "cpu", "max_model_len": 64, "max_batch_size": 2, "max_num_batched_tokens": 8, "page_size": 4}
    eager = LLM(loaded, **kwargs)  # type: ignore[arg-type]
    graphed = LLM(loaded, **kwargs)  # type: ignore[arg-type]
    runner = graphed.runner
    runner.step_graphs = StepGraphs(runner, 2, 8, smallest=4)
    calls = []

    def fail(name: str, *args: object, **kw: object) -> None:
        calls.append(name)
        if name == "tokens_4":  # the second graph: the first one was captured and must be dropped
            raise RuntimeError("operation not permitted when stream is capturing")
        real(name, *args, **kw)

    real = runner.step_graphs.pool.capture
    monkeypatch.setattr(runner.step_graphs.pool, "capture", fail)
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    many = [prompts[0][:13], prompts[1][:11], prompts[2]]
    with pytest.warns(BackendFallbackWarning, match="capturing the step graphs failed: RuntimeError") as caught:
        got = graphed.generate(many, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in eager.generate(many, params)]
    assert len([w for w in caught if issubclass(w.category, BackendFallbackWarning)]) == 1
    assert calls == ["tokens_8", "tokens_4"] and runner.step_graphs is None


def test_step_graphs_argument_is_checked(loaded: LoadedModel) -> None:
    with pytest.raises(ConfigurationError, match="expected step_graphs to be True, False or None"):
        LLM(loaded, device="cpu", step_graphs="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("continuous", [True, False])
def test_a_request_larger_than_the_cache_fails_alone(continuous: bool, loaded: LoadedModel) -> None:
    flags = EngineFlags() if continuous else EngineFlags().without("continuous_batching")
    llm = LLM(loaded, flags=flags, device="cpu", max_model_len=128, page_size=4, num_blocks=8)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    small, huge, small2 = llm.generate([[5, 6, 7], list(range(3, 40)), [9, 10]], params)
    assert huge.error is not None and huge.finish_reason == "error" and huge.token_ids == []
    assert isinstance(huge.error, RequestTooLargeError) and "whole cache has 8" in str(huge.error)
    assert small.error is None and len(small.token_ids) == 4
    assert small2.error is None and len(small2.token_ids) == 4


def test_step_metadata_matches_the_tables_and_forgets_released_sequences(loaded: LoadedModel) -> None:
    from llamatelemetry_core.kv_layout import PAD_BLOCK
    from llamatelemetry_core.serving import SequenceStep

    runner = LLM(loaded, device="cpu", max_model_len=64, page_size=4).runner
    steps = (SequenceStep(3, (7,), 5, (9, 2)), SequenceStep(8, (1, 2, 3), 0, (4,)), SequenceStep(5, (6,), 8, (0, 1, 6)))
    slots, tables, lens, cu = runner.paged_metadata(steps)
    assert slots.tolist() == [2 * 4 + 1, 16, 17, 18, 6 * 4 + 0]
    assert tables.tolist() == [[9, 2, PAD_BLOCK], [4, PAD_BLOCK, PAD_BLOCK], [0, 1, 6]]
    assert lens.tolist() == [6, 3, 9] and cu.tolist() == [0, 1, 4, 5]
    ids, positions, slots2, tables2, lens2 = runner.decode_metadata((steps[0], steps[2]), width=4)
    assert ids.tolist() == [7, 6] and positions.tolist() == [5, 8] and slots2.tolist() == [9, 24]
    assert tables2.tolist() == [[9, 2, PAD_BLOCK, PAD_BLOCK], [0, 1, 6, PAD_BLOCK]] and lens2.tolist() == [6, 9]
    grown = SequenceStep(3, (7,), 8, (9, 2, 11))  # the sequence grew into a new block: a new table
    assert runner.decode_metadata((grown,), width=4)[3].tolist() == [[9, 2, 11, PAD_BLOCK]]
    runner.release(3)
    assert 3 not in runner._table_rows and 5 in runner._table_rows


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU emulation of graphs only; with CUDA, capture refuses CPU tensors"
)
@pytest.mark.parametrize("graphs", ["eager", "decode", "step"])
def test_overlapped_steps_take_their_tokens_from_the_device(
    graphs: str,
    loaded: LoadedModel,
    prompts: list[list[int]],
    hf_reference: Callable[[LoadedModel], torch.nn.Module],
    greedy: Greedy,
) -> None:
    # With overlap, every step after the first takes the tokens sampled last step from the device (a TokenFeed)
    # through the eager path, a decode graph or a step graph; prefix reuse and chunks go on as without.
    many = [prompts[0][:13], prompts[1][:11], prompts[2], prompts[0][:13]]
    expected = [greedy(hf_reference(loaded), p, 4) for p in many]
    llm = LLM(loaded, device="cpu", max_model_len=64, max_batch_size=2, max_num_batched_tokens=8, page_size=4,
              overlap=True)  # fmt: skip
    runner = llm.runner
    if graphs == "decode":
        runner.graphs = DecodeGraphs(runner, 2)
    elif graphs == "step":
        runner.step_graphs = StepGraphs(runner, 2, 8, smallest=4)
    fed = []
    original = runner.apply_feed

    def spy(*args: object) -> None:
        fed.append(args[2])
        original(*args)  # type: ignore[arg-type]

    runner.apply_feed = spy  # type: ignore[method-assign,assignment]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    assert [c.token_ids for c in llm.generate(many, params)] == expected
    assert fed, "no step took its tokens from the device"
    assert llm.continuous_server().engine.overlap


def test_apply_feed_writes_the_fed_tokens_where_they_belong(loaded: LoadedModel) -> None:
    from llamatelemetry_core.serving import SequenceStep, TokenFeed

    runner = LLM(loaded, device="cpu", max_model_len=64, page_size=4).runner
    steps = (SequenceStep(1, (0,), 5), SequenceStep(2, (0,), 3), SequenceStep(3, (4, 5, 6), 0))
    ids = torch.tensor([0, 0, 4, 5, 6])
    runner.apply_feed(ids, steps, TokenFeed(torch.tensor([10, 11]), (0, 1, -1)))  # the same order: a prefix copy
    assert ids.tolist() == [10, 11, 4, 5, 6]
    moved = (SequenceStep(3, (4, 5), 0), SequenceStep(2, (0,), 3), SequenceStep(1, (0,), 5))
    ids = torch.tensor([4, 5, 0, 0])
    runner.apply_feed(ids, moved, TokenFeed(torch.tensor([10, 11, 12]), (-1, 2, 0)))  # reordered: gather, scatter
    assert ids.tolist() == [4, 5, 12, 10]


@pytest.mark.parametrize("overlap", [False, True])
def test_warm_up_runs_every_kind_of_step_and_changes_no_answer(
    overlap: bool, loaded: LoadedModel, prompts: list[list[int]]
) -> None:
    kwargs = {"device": "cpu", "max_model_len": 64, "max_batch_size": 2, "max_num_batched_tokens": 8, "page_size": 4}
    cold = LLM(loaded, overlap=overlap, warmup=False, **kwargs)  # type: ignore[arg-type]
    warm = LLM(loaded, overlap=overlap, warmup=True, **kwargs)  # type: ignore[arg-type]
    assert cold.warmup_seconds == 0.0 and warm.warmup_seconds > 0.0
    steps = warm.runner.steps
    assert steps >= 5, "the warm-up prompts must be chunked beside decodes"
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    assert [c.token_ids for c in warm.generate(prompts, params)] == [
        c.token_ids for c in cold.generate(prompts, params)
    ]
    with pytest.raises(ConfigurationError, match="warmup"):
        LLM(loaded, warmup=1, **kwargs)  # type: ignore[arg-type]


@pytest.mark.kernel_paths
@pytest.mark.parametrize("triton_kernels", [True, False], ids=["fused", "two_calls"])
def test_rope_and_the_paged_write_are_one_call_with_the_fused_kernels(
    triton_kernels: bool,
    loaded: LoadedModel,
    prompts: list[list[int]],
    hf_reference: Callable[[LoadedModel], torch.nn.Module],
    greedy: Greedy,
) -> None:
    # Each layer of a paged step rotates q and k and stores k and v with one call when the fused kernels are on
    # (chunked prefill, prefix reuse and decode alike); with them off, the plain rotation and the cache's write.
    from llamatelemetry_core.environment import triton_interpreter_enabled
    from llamatelemetry_core.selection import record_selections
    from llamatelemetry_triton import HAS_TRITON

    expected = [greedy(hf_reference(loaded), p, 4) for p in prompts]
    flags = EngineFlags() if triton_kernels else EngineFlags().without("triton_kernels")
    llm = LLM(loaded, flags=flags, device="cpu", max_model_len=64, max_num_batched_tokens=8, page_size=4)
    with record_selections() as rec:
        got = llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True))
    assert [c.token_ids for c in got] == expected
    fused = rec.implementations("triton.rope_paged_write")
    if triton_kernels:
        kernel = "triton" if HAS_TRITON and triton_interpreter_enabled() else "reference"
        assert fused and set(fused) == {kernel}
        assert not rec.implementations("triton.rope") and not rec.implementations("kvcache.paged_write")
    else:
        assert not fused and rec.implementations("kvcache.paged_write")


def test_a_quantized_store_takes_the_two_calls(loaded: LoadedModel) -> None:
    # The fused call does not take an int8 store (its scales come from the rotated keys): the step declines,
    # touching nothing, and the layer rotates and writes through the cache as before.
    from llamatelemetry_engine.context import PagedStep
    from llamatelemetry_kvcache import KVCacheConfig, PagedKVCache
    from llamatelemetry_triton import rope_cos_sin

    config = KVCacheConfig(1, 16, 1, 4, 8, torch.float32, num_kv_heads=2, device="cpu", kv_dtype=torch.int8)
    cache = PagedKVCache(config, 4)
    cache.block_manager.allocate(0, [1, 2, 3])
    slots = cache.slot_mapping([(0, 0, 3)])
    step = PagedStep(
        cache, lambda *a, **kw: a[0], slot_mapping=slots, block_tables=torch.zeros(1, 4, dtype=torch.int32),
        seq_lens=torch.tensor([3], dtype=torch.int32), cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32),
        max_seqlen_q=3,
    )  # fmt: skip
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    cos, sin = rope_cos_sin(16, 8)
    before = (q.clone(), k.clone(), cache.layer(0).key_cache.clone())
    assert not step.rotate_and_store(0, torch.arange(3), q, k, v, cos, sin)
    assert torch.equal(q, before[0]) and torch.equal(k, before[1])
    assert torch.equal(cache.layer(0).key_cache, before[2])
