"""PagedKVCache and the paged write: the Triton kernel against the reference, gather, forks, budgets, errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llamatelemetry_core.device import get_device_info
from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.kv_layout import PAD_SLOT, PagedKV, PagedKVLayout
from llamatelemetry_core.selection import record_selections
from llamatelemetry_core.testing import assert_close
from llamatelemetry_kvcache import KVCacheConfig, PagedKVCache, paged_write, paged_write_reference
from llamatelemetry_kvcache import paged as paged_module
from llamatelemetry_kvcache.paged_write import as_bytes

FP8 = getattr(torch, "float8_e4m3fn", None)


# Triton-marked tests run the kernel where Triton runs: on the GPU when there is one, else in the interpreter.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _store(layout: PagedKVLayout, device: str = "cpu") -> PagedKV:
    # Random contents: a write must leave every slot it does not address exactly as it was.
    def tensor() -> torch.Tensor:
        if layout.dtype == torch.int8:
            return torch.randint(-127, 128, layout.kv_shape, dtype=torch.int8, device=device)
        return torch.randn(layout.kv_shape, device=device).to(layout.dtype)

    if not layout.quantized:
        return PagedKV(tensor(), tensor())
    scales = (torch.rand(layout.scale_shape, device=device) for _ in range(2))
    return PagedKV(tensor(), tensor(), *scales)


def _clone(store: PagedKV) -> PagedKV:
    scales = (store.key_scale, store.value_scale)
    key_scale, value_scale = (None if t is None else t.clone() for t in scales)
    return PagedKV(store.key_cache.clone(), store.value_cache.clone(), key_scale, value_scale)


def _assert_same(a: PagedKV, b: PagedKV) -> None:
    for x, y in zip(
        (a.key_cache, a.value_cache, a.key_scale, a.value_scale),
        (b.key_cache, b.value_cache, b.key_scale, b.value_scale),
        strict=True,
    ):
        assert (x is None) == (y is None)
        if x is not None and y is not None:
            assert torch.equal(as_bytes(x), as_bytes(y))


@pytest.mark.triton
@pytest.mark.parametrize(
    ("page_size", "num_blocks", "kv_heads", "head_dim", "slots"),
    [
        (1, 9, 2, 8, [4, 0, 8]),
        (16, 3, 3, 24, [17]),  # one token, mid-block; head_dim not a power of two
        (16, 4, 2, 16, [*range(32, 51), PAD_SLOT, PAD_SLOT]),  # 19 tokens ending mid-block, padded tail
        (4, 5, 5, 8, [3, PAD_SLOT, 12, 13, 0]),
    ],
)
@pytest.mark.parametrize(
    ("dtype", "kv_dtype"),
    [(torch.float16, None), (torch.float32, None), (torch.float16, torch.int8), (torch.float32, torch.int8)],
)
def test_triton_write_matches_the_reference_bit_for_bit(
    page_size: int,
    num_blocks: int,
    kv_heads: int,
    head_dim: int,
    slots: list[int],
    dtype: torch.dtype,
    kv_dtype: torch.dtype | None,
) -> None:
    layout = PagedKVLayout(num_blocks, page_size, kv_heads, head_dim, kv_dtype or dtype)
    store = _store(layout, KERNEL_DEVICE)
    expected = _clone(store)
    key = torch.randn(len(slots), kv_heads, head_dim, device=KERNEL_DEVICE).to(dtype) * 3
    value = torch.randn(len(slots), kv_heads, head_dim, device=KERNEL_DEVICE).to(dtype)
    if kv_dtype is not None:
        key[0, 0] = 0  # an all-zero head: scale 1, no division by zero
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=KERNEL_DEVICE)
    paged_write_reference(key, value, expected, slot_mapping)
    with record_selections() as rec:
        paged_write(key, value, store, slot_mapping, backend="triton")
    assert rec.last("paged_kv_write") == "triton"
    _assert_same(store, expected)


@pytest.mark.triton
def test_triton_write_takes_strided_inputs() -> None:
    layout = PagedKVLayout(4, 4, 2, 8, torch.float32)
    store = _store(layout, KERNEL_DEVICE)
    expected = _clone(store)
    both = torch.randn(3, 2, 2, 8, device=KERNEL_DEVICE)  # K and V interleaved: non-contiguous token stride
    key, value = both[:, 0], both[:, 1]
    slots = torch.tensor([[5, 99], [6, 99], [15, 99]], device=KERNEL_DEVICE)[:, 0]  # a column: stride 2
    paged_write_reference(key, value, expected, slots)
    paged_write(key, value, store, slots, backend="triton")
    _assert_same(store, expected)


def test_reference_writes_exactly_the_addressed_slots() -> None:
    layout = PagedKVLayout(3, 2, 1, 4, torch.float32)
    store = _store(layout)
    before = _clone(store)
    key, value = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    paged_write_reference(key, value, store, torch.tensor([3, PAD_SLOT]))
    assert torch.equal(store.key_cache[1, 1], key[0]) and torch.equal(store.value_cache[1, 1], value[0])
    store.key_cache[1, 1] = before.key_cache[1, 1]
    store.value_cache[1, 1] = before.value_cache[1, 1]
    _assert_same(store, before)


def _config(kv_dtype: torch.dtype | None = None, dtype: torch.dtype = torch.float32) -> KVCacheConfig:
    return KVCacheConfig(4, 40, 2, 4, 8, dtype, num_kv_heads=2, device="cpu", kv_dtype=kv_dtype)


def _run(cache: PagedKVCache, seq_id: int, start: int, new: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Write ``new`` random tokens of a sequence at ``start`` into every layer, as a model runner would."""
    slots = cache.slot_mapping([(seq_id, start, start + new)])
    written = []
    for layer in range(cache.config.num_layers):
        k = torch.randn(new, 2, 8).to(cache.config.dtype)
        v = torch.randn(new, 2, 8).to(cache.config.dtype)
        cache.write(layer, k, v, slots)
        written.append((k, v))
    return written


def test_the_guide_call_and_default_size() -> None:
    config = _config()
    paged = PagedKVCache(config, page_size=16)
    assert paged.num_blocks == 4 * 3 and paged.page_size == 16
    assert paged.nbytes() == 2 * 12 * 16 * config.bytes_per_token()
    assert paged.layer(1).validate() == paged.page_layout


@pytest.mark.parametrize("page_size", [1, 16])
def test_sequences_read_back_what_was_written(page_size: int) -> None:
    cache = PagedKVCache(_config(), page_size=page_size, num_blocks=64 // page_size + 8)
    manager = cache.block_manager
    manager.allocate(0, list(range(7)))
    manager.allocate(1, list(range(100, 103)))
    first = {0: _run(cache, 0, 0, 7), 1: _run(cache, 1, 0, 3)}
    manager.append(0, [7])
    second = _run(cache, 0, 7, 1)
    for layer in range(2):
        k, v = cache.gather(0, layer)
        assert torch.equal(k, torch.cat([first[0][layer][0], second[layer][0]]))
        assert torch.equal(v, torch.cat([first[0][layer][1], second[layer][1]]))
    k_all, _ = cache.gather(1)
    assert k_all.shape == (2, 3, 2, 8)
    assert torch.equal(k_all[1], first[1][1][0])
    tables, lens = cache.block_tables([0, 1])
    assert lens.tolist() == [8, 3] and tables.dtype == torch.int32


def test_fork_copies_the_partial_block_and_isolates_the_child() -> None:
    cache = PagedKVCache(_config(), page_size=4, num_blocks=8)
    manager = cache.block_manager
    manager.allocate(0, list(range(6)))
    _run(cache, 0, 0, 6)
    cache.fork(0, 1)
    before = cache.gather(0)
    assert all(torch.equal(a, b) for a, b in zip(before, cache.gather(1), strict=True))
    manager.append(1, [9])
    _run(cache, 1, 6, 1)  # the child writes into its own copy of the partial block
    after = cache.gather(0)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert cache.gather(1)[0].shape[1] == 7


@pytest.mark.parametrize("kv_dtype", [torch.int8, FP8], ids=["int8", "fp8"])
def test_quantized_store_round_trips(kv_dtype: torch.dtype | None) -> None:
    if kv_dtype is None:
        pytest.skip("this torch has no float8_e4m3fn")
    cache = PagedKVCache(_config(kv_dtype, torch.float16), page_size=4)
    layer = cache.layer(0)
    assert layer.key_cache.dtype == kv_dtype and layer.key_scale is not None
    cache.block_manager.allocate(3, list(range(5)))
    written = _run(cache, 3, 0, 5)
    k, v = cache.gather(3, 0)
    assert k.dtype == torch.float16
    tol = 1 / 127 if kv_dtype == torch.int8 else 1 / 16
    amax = written[0][0].float().abs().amax(-1, keepdim=True)
    assert ((k.float() - written[0][0].float()).abs() <= amax * tol + 1e-3).all()
    assert_close(v.float(), written[0][1].float(), atol=0.15, rtol=0.07)


def test_memory_budget_in_bytes_and_as_a_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config()
    block_bytes = 2 * 16 * config.bytes_per_token()
    assert PagedKVCache(config, 16, memory_budget=10 * block_bytes + 5).num_blocks == 10
    # A fraction of free memory, with free memory pinned (it moves while other processes run).
    free = 123 * block_bytes + 7
    pinned = dataclasses.replace(get_device_info("cpu"), free_memory_bytes=free)
    monkeypatch.setattr(paged_module, "get_device_info", lambda *a, **k: pinned)
    assert PagedKVCache(config, 16, memory_budget=0.5).num_blocks == int(free * 0.5) // block_bytes == 61
    with pytest.raises(CapacityError, match="holds no block"):
        PagedKVCache(config, 16, memory_budget=block_bytes - 1)
    with pytest.raises(ConfigurationError, match="not both"):
        PagedKVCache(config, 16, num_blocks=3, memory_budget=100)
    with pytest.raises(ConfigurationError, match=r"fraction in \(0, 1\]"):
        PagedKVCache(config, 16, memory_budget=1.5)


def test_bad_writes_say_expected_and_got() -> None:
    cache = PagedKVCache(_config(), page_size=4, num_blocks=4)
    k = torch.randn(2, 2, 8)
    with pytest.raises(ConfigurationError, match=r"num_kv_heads=2, head_dim=8\], got \[2, 3, 8\]"):
        cache.write(0, torch.randn(2, 3, 8), k, torch.tensor([0, 1]))
    with pytest.raises(ConfigurationError, match=r"int64 \[2\]"):
        cache.write(0, k, k, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ConfigurationError, match=r"dtype torch\.float32"):
        cache.write(0, k.half(), k.half(), torch.tensor([0, 1]))
    with pytest.raises(ConfigurationError, match=r"layer_idx in \[0, 2\)"):
        cache.layer(2)
    with pytest.raises(CapacityError, match="paged KV cache needs"):
        PagedKVCache(KVCacheConfig(1, 1, 64, 64, 256, torch.float32, device="cpu"), 16, num_blocks=1 << 24)


@pytest.mark.triton
def test_the_write_custom_op_passes_opcheck_and_compiles() -> None:
    from llamatelemetry_kvcache import write_kernel

    layout = PagedKVLayout(3, 4, 2, 8, torch.int8)
    store = _store(layout, KERNEL_DEVICE)
    key, value = torch.randn(5, 2, 8, device=KERNEL_DEVICE), torch.randn(5, 2, 8, device=KERNEL_DEVICE)
    slots = torch.tensor([0, 5, PAD_SLOT, 11, 2], device=KERNEL_DEVICE)
    checked = _clone(store)
    args = (key, value, checked.key_cache, checked.value_cache, checked.key_scale, checked.value_scale, slots)
    op = torch.ops.llamatelemetry.kvcache_paged_write
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    expected = _clone(store)
    paged_write_reference(key, value, expected, slots)

    @torch.compile(backend="eager")
    def write(k: torch.Tensor, v: torch.Tensor) -> None:
        write_kernel.triton_paged_write(k, v, store, slots)

    write(key, value)
    _assert_same(store, expected)  # the untouched store, written through the compiled custom op


def test_refused_writes_change_nothing_and_name_the_argument() -> None:
    config = KVCacheConfig(1, 8, 1, 2, 4, torch.float32, device="cpu")
    cache = PagedKVCache(config, 4, num_blocks=2)
    cache.block_manager.allocate(0, [1, 2])
    slots = cache.slot_mapping([(0, 0, 2)])
    k = torch.randn(2, 2, 4)
    for values, mapping, match in (
        (k.half(), slots, "values of dtype"),
        (k, torch.tensor([0, 8]), "slot_mapping in"),
        (k, torch.tensor([0, -2]), "slot_mapping in"),
    ):
        with pytest.raises(ConfigurationError, match=match):
            cache.write(0, k, values, mapping)
        assert cache._zeroed_blocks == 0, "a refused write leaves the lazily zeroed store alone"
    with pytest.raises(TypeError, match="keys"):
        cache.write(0, None, k, slots)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_blocks_per_seq"):
        cache.block_tables([0], max_blocks_per_seq=3)  # wider than ceil(8 / 4)


def test_prepared_slots_are_zeroed_as_a_write_would_zero_them() -> None:
    # A kernel storing into layer(i) directly (RoPE fused with the store) finds the blocks a write would find:
    # CPU storage zeroed up to the last block a slot names, and the blocks past it still untouched.
    config = KVCacheConfig(1, 24, 2, 2, 4, torch.float32, device="cpu")
    cache = PagedKVCache(config, 4, num_blocks=6)
    for layer in range(2):
        for t in (cache.layer(layer).key_cache, cache.layer(layer).value_cache):
            t.fill_(float("nan"))  # what uninitialised CPU memory may hold
    cache.prepare_slots(torch.tensor([PAD_SLOT, PAD_SLOT]))  # padding alone names no block
    assert cache._zeroed_blocks == 0
    cache.prepare_slots(torch.tensor([5, PAD_SLOT, 9]))
    assert cache._zeroed_blocks == 3
    for layer in range(2):
        store = cache.layer(layer)
        assert torch.equal(store.key_cache[:3], torch.zeros(3, 4, 2, 4))
        assert store.value_cache[3:].isnan().all()
    cache.prepare_slots(torch.tensor([99]))  # out of range: the kernel's checks refuse it; zeroing stops at the end
    assert cache._zeroed_blocks == 6


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8], ids=["same", "int8"])
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_paged_write_compiles_fullgraph_and_writes_in_place(
    compiler: str, kv_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llamatelemetry_core.selection import BACKEND_ENV, reload_environment

    layout = PagedKVLayout(num_blocks=5, page_size=4, num_kv_heads=2, head_dim=8, dtype=kv_dtype)
    original = _store(layout)
    expected, store = _clone(original), _clone(original)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    slots = torch.tensor([7, PAD_SLOT, 12])
    paged_write_reference(key, value, expected, slots)

    def step(k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        paged_write(k, v, store, s)
        return k.sum()  # something after the write, so the write is not the graph's last node

    explained = torch._dynamo.explain(step)(key, value, slots)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    store = _clone(original)  # explain ran the step: the compiled run starts from the unwritten contents
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    monkeypatch.setenv(BACKEND_ENV, "kvcache.paged_write=reference")
    reload_environment()
    with record_selections() as record:
        compiled(key, value, slots)
    _assert_same(store, expected)
    assert record.implementations("kvcache.paged_write") == ["reference"]
    with pytest.raises(ConfigurationError, match="slot_mapping in"):  # the checks run inside the op
        compiled(key, value, torch.tensor([7, 99, 12]))
    monkeypatch.delenv(BACKEND_ENV)
    reload_environment()
    torch._dynamo.reset()
