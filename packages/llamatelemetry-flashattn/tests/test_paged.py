"""paged_attention against its reference, and the reference against plain attention on gathered K/V.

Paged stores are built by hand here (random blocks, shuffled block tables, padding entries), the way any writer
of :mod:`llamatelemetry_core.kv_layout` would fill them. CPU: the reference always; the Triton kernels in the
interpreter (``TRITON_INTERPRET=1``) on small shapes. GPU (``gpu`` marker): the kernels at larger sizes, with each
device's tiles, split-KV, quantized storage, and CUDA graph capture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_core.errors import BackendUnavailableError
from llamatelemetry_core.kv_layout import PAD_BLOCK, PagedKV
from llamatelemetry_core.selection import record_selections
from llamatelemetry_core.testing import Tolerance, assert_close, tolerance_for
from llamatelemetry_flashattn import attention_reference, flash_attention_forward, paged_attention, paged_decode

if TYPE_CHECKING:
    from llamatelemetry_flashattn.paged_tiles import PagedLaunch

FP8 = getattr(torch, "float8_e4m3fn", None)
# The CPU tests run the Triton kernels on CPU tensors, which only the interpreter can (the cpu-triton matrix);
# on a GPU the gpu-marked tests below run them on the device instead.
INTERPRETED = [
    pytest.mark.triton,
    pytest.mark.skipif(
        not triton_interpreter_enabled(),
        reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (the cpu-triton matrix)",
    ),
]


def interpreted(test: Callable[..., None]) -> Callable[..., None]:
    for mark in INTERPRETED:
        test = mark(test)
    return test


@dataclass(frozen=True)
class Store:
    """A paged store with its step metadata, and the contiguous K/V each sequence stands for."""

    kv: PagedKV
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    q: torch.Tensor
    keys: list[torch.Tensor]  # per sequence, [seq_len, kv_heads, head_dim], dequantized, float64
    values: list[torch.Tensor]

    @property
    def max_seqlen_q(self) -> int:
        return int((self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).max())

    def to(self, device: str) -> Store:
        old = self.kv
        kv = PagedKV(
            old.key_cache.to(device),
            old.value_cache.to(device),
            None if old.key_scale is None else old.key_scale.to(device),
            None if old.value_scale is None else old.value_scale.to(device),
        )
        return replace(
            self,
            kv=kv,
            block_tables=self.block_tables.to(device),
            seq_lens=self.seq_lens.to(device),
            cu_seqlens_q=self.cu_seqlens_q.to(device),
            q=self.q.to(device),
        )


def quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token, per-head quantization of ``[..., head_dim]``: (stored values, float32 scales)."""
    top = 127.0 if dtype == torch.int8 else 448.0
    scale = (x.abs().amax(-1) / top).clamp_min(1e-8).float()
    scaled = x / scale.unsqueeze(-1)
    stored = scaled.round().clamp(-127, 127).to(dtype) if dtype == torch.int8 else scaled.to(dtype)
    return stored, scale


def make_store(
    generator: torch.Generator,
    seq_lens: list[int],
    q_lens: list[int],
    *,
    page_size: int = 16,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    kv_dtype: torch.dtype | None = None,
    spare_blocks: int = 3,
) -> Store:
    """Random K/V in shuffled blocks; block tables padded with PAD_BLOCK past each sequence's last block."""
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    needed = [-(-n // page_size) for n in seq_lens]
    num_blocks = max(1, sum(needed) + spare_blocks)
    width = max([*needed, 1])
    shape = (num_blocks, page_size, kv_heads, head_dim)
    k_full = torch.randn(shape, generator=generator, dtype=torch.float64)
    v_full = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kv_dtype in (torch.int8, FP8):
        k_stored, k_scale = quantize(k_full, kv_dtype)
        v_stored, v_scale = quantize(v_full, kv_dtype)
        kv = PagedKV(k_stored, v_stored, k_scale, v_scale)
        k_full = k_stored.double() * k_scale.double().unsqueeze(-1)
        v_full = v_stored.double() * v_scale.double().unsqueeze(-1)
    else:
        kv = PagedKV(k_full.to(kv_dtype), v_full.to(kv_dtype))
        k_full, v_full = kv.key_cache.double(), kv.value_cache.double()
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.full((len(seq_lens), width), PAD_BLOCK, dtype=torch.int32)
    keys, values = [], []
    for i, (n, blocks) in enumerate(zip(seq_lens, needed, strict=True)):
        mine = [order.pop() for _ in range(blocks)]
        tables[i, :blocks] = torch.tensor(mine, dtype=torch.int32)
        index = torch.tensor(mine, dtype=torch.long)
        keys.append(k_full[index].reshape(-1, kv_heads, head_dim)[:n])
        values.append(v_full[index].reshape(-1, kv_heads, head_dim)[:n])
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), heads, head_dim, generator=generator).to(dtype)
    return Store(kv, tables, torch.tensor(seq_lens, dtype=torch.int32), cu, q, keys, values)


def oracle(store: Store, **options: object) -> torch.Tensor:
    """Each sequence's queries through plain attention over its gathered K/V, in float64."""
    rows = []
    cu = store.cu_seqlens_q.tolist()
    for i in range(len(store.keys)):
        q = store.q[cu[i] : cu[i + 1]].cpu().double()
        if store.keys[i].shape[0] == 0:
            rows.append(torch.zeros_like(q))
            continue
        out = attention_reference(q[None], store.keys[i][None], store.values[i][None], **options)  # type: ignore[arg-type]
        rows.append(out[0])
    return torch.cat(rows)


def tolerance(dtype: torch.dtype) -> Tolerance:
    """As flashattn's forward tests: the probabilities enter the second matmul rounded to q's dtype."""
    base = tolerance_for(dtype)
    return base.scaled(4.0) if dtype in (torch.float16, torch.bfloat16) else base.scaled(10.0)


def run(store: Store, backend: str | None, **options: object) -> torch.Tensor:
    return paged_attention(
        store.q,
        store.kv,
        store.block_tables,
        store.seq_lens,
        store.cu_seqlens_q,
        max_seqlen_q=store.max_seqlen_q,
        backend=backend,
        **options,  # type: ignore[arg-type]
    )


def launched(store: Store, launch: PagedLaunch | None, **options: object) -> torch.Tensor:
    """The Triton kernels on ``store``'s step with a forced ``launch`` (``None``: the library's own choice)."""
    from llamatelemetry_flashattn.paged_kernel import triton_paged_attention

    return triton_paged_attention(
        store.q,
        store.kv,
        store.block_tables,
        store.seq_lens,
        store.cu_seqlens_q,
        max_seqlen_q=store.max_seqlen_q,
        launch=launch,
        **options,  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class Case:
    name: str
    seq_lens: tuple[int, ...]
    q_lens: tuple[int, ...]
    page_size: int = 16
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    causal: bool = True
    window: tuple[int, int] | None = None
    softcap: float | None = None

    def store(self, generator: torch.Generator, dtype: torch.dtype, kv_dtype: torch.dtype | None = None) -> Store:
        return make_store(
            generator,
            list(self.seq_lens),
            list(self.q_lens),
            page_size=self.page_size,
            heads=self.heads,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype=dtype,
            kv_dtype=kv_dtype,
        )

    def options(self) -> dict[str, object]:
        return {"causal": self.causal, "window_size": self.window, "softcap": self.softcap}

    def scaled(self, factor: int) -> Case:
        return replace(self, seq_lens=tuple(n * factor for n in self.seq_lens))


CASES = [
    Case("decode-ragged", (37, 5, 16, 1), (1, 1, 1, 1)),
    Case("decode-page1", (9, 3), (1, 1), page_size=1, heads=3, kv_heads=1),
    Case("decode-one-token", (1,), (1,), heads=4, kv_heads=4),
    Case("decode-mid-block-gqa3", (21, 50), (1, 1), heads=6, kv_heads=2),
    Case("prefill-chunk", (37, 20), (9, 4), heads=8, kv_heads=2),
    Case("prefill-from-empty", (13, 30), (13, 30), page_size=4, heads=4, kv_heads=1),
    Case("prefill-page1", (11, 6), (5, 6), page_size=1, heads=2, kv_heads=2),
    Case("window", (45, 12), (6, 1), window=(7, -1), heads=4, kv_heads=2),
    Case("softcap", (33,), (3,), softcap=4.0, heads=4, kv_heads=1),
    Case("window-softcap-non-causal", (40, 9), (5, 2), causal=False, window=(6, 3), softcap=10.0),
    Case("d128", (29, 17), (1, 2), head_dim=128, heads=2, kv_heads=1),
    Case("d80", (23,), (4,), head_dim=80, heads=3, kv_heads=1),
    Case("page64", (70, 3), (2, 1), page_size=64, heads=2, kv_heads=1),
    Case("padding-sequence", (19, 0, 7), (1, 1, 1)),
]
IDS = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_equals_attention_over_gathered_kv(case: Case, rng: torch.Generator) -> None:
    store = case.store(rng, torch.float32)
    out = run(store, "reference", **case.options())
    tol = tolerance(torch.float32)
    assert_close(out, oracle(store, **case.options()), atol=tol.atol, rtol=tol.rtol, name=f"reference/{case.name}")


@interpreted
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_matches_the_reference(case: Case, rng: torch.Generator) -> None:
    store = case.store(rng, torch.float32)
    with record_selections() as record:
        out = run(store, "triton", **case.options())
    assert record.last("paged_attention") == "triton"
    tol = tolerance(torch.float32)
    assert_close(out, oracle(store, **case.options()), atol=tol.atol, rtol=tol.rtol, name=f"triton/{case.name}")


@interpreted
@pytest.mark.parametrize("splits", [2, 3, 5])
def test_split_kv_merges_to_the_same_result(splits: int, rng: torch.Generator) -> None:
    from llamatelemetry_flashattn.paged_tiles import PagedLaunch, PagedTiles

    # Sequence lengths that leave some parts empty (3 keys over 5 parts), a padding sequence, and a window.
    store = make_store(rng, [70, 3, 0, 41], [1, 1, 1, 2], heads=4, kv_heads=2)
    launch = PagedLaunch(PagedTiles(16, 16, 64, 4, 1), splits)
    for options in ({"causal": True}, {"causal": True, "window_size": (20, -1), "softcap": 5.0}):
        out = launched(store, launch, **options)
        tol = tolerance(torch.float32)
        assert_close(out, oracle(store, **options), atol=tol.atol, rtol=tol.rtol, name=f"split{splits}/{options}")


@interpreted
@pytest.mark.parametrize("page_size", [1, 4, 8])
@pytest.mark.parametrize("kv_name", ["fp32", "int8"])
def test_one_block_id_per_page_is_exact(page_size: int, kv_name: str, rng: torch.Generator) -> None:
    """The per-page address path (tiles spanning whole pages) computes what the per-key path and reference do."""
    from llamatelemetry_flashattn.paged_tiles import PagedLaunch, PagedTiles, uses_page_ids

    kv_dtype = torch.int8 if kv_name == "int8" else torch.float32
    # Lengths ending inside a page and inside a tile, a padding sequence, decode and a chunk of prefill.
    store = make_store(rng, [37, 5, 0, 16], [3, 1, 1, 2], page_size=page_size, heads=4, kv_heads=2, kv_dtype=kv_dtype)
    tiles = PagedTiles(16, 16, 64, 4, 1, page_ids=True)
    assert uses_page_ids(tiles, page_size)
    for splits, options in ((1, {"causal": True}), (3, {"causal": True, "window_size": (9, -1), "softcap": 5.0})):
        out = launched(store, PagedLaunch(tiles, splits), **options)
        tol = tolerance(torch.float32)
        want = oracle(store, **options)
        assert_close(out, want, atol=tol.atol, rtol=tol.rtol, name=f"page-ids/p{page_size}/{kv_name}/{options}")


def test_page_ids_only_where_a_tile_spans_whole_pages() -> None:
    from llamatelemetry_flashattn.paged_tiles import PagedTiles, uses_page_ids

    tiles = PagedTiles(16, 64, 128, 4, 3, page_ids=True)
    assert [p for p in (1, 3, 8, 16, 48, 64, 128) if uses_page_ids(tiles, p)] == [1, 8, 16]
    assert not uses_page_ids(PagedTiles(16, 64, 128, 4, 3), 16)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=INTERPRETED)])
def test_half_precision(backend: str, rng: torch.Generator) -> None:
    case = Case("half", (45, 19), (3, 1), heads=4, kv_heads=1)
    for dtype in (torch.float16, torch.bfloat16):
        store = case.store(rng, dtype)
        if backend == "triton" and dtype == torch.bfloat16 and triton_interpreter_enabled():
            # NumPy has no bfloat16: the interpreter would compute garbage, so the kernel refuses it there.
            with pytest.raises(BackendUnavailableError, match="bfloat16"):
                run(store, backend)
            continue
        tol = tolerance(dtype)
        assert_close(run(store, backend), oracle(store), atol=tol.atol, rtol=tol.rtol, name=f"{backend}/{dtype}")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=INTERPRETED)])
def test_int8_kv_matches_its_dequantized_values(backend: str, rng: torch.Generator) -> None:
    case = Case("int8", (50, 7, 16), (1, 3, 1), heads=6, kv_heads=2)
    store = case.store(rng, torch.float32, torch.int8)
    tol = tolerance(torch.float32)
    assert_close(run(store, backend), oracle(store), atol=tol.atol, rtol=tol.rtol, name=f"{backend}/int8")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=INTERPRETED)])
def test_int8_kv_error_against_fp16_kv(backend: str, rng: torch.Generator) -> None:
    """The accuracy cost of int8 storage: attention output error against the same K/V kept in fp16."""
    seq_lens, q_lens = [200, 64, 129], [1, 1, 1]
    state = rng.get_state()
    exact = make_store(rng, seq_lens, q_lens, kv_dtype=torch.float16, dtype=torch.float16)
    rng.set_state(state)
    int8 = make_store(rng, seq_lens, q_lens, kv_dtype=torch.int8, dtype=torch.float16)
    want = oracle(exact)
    got = run(int8, backend)
    error = (got.double() - want).abs()
    print(f"int8 KV vs fp16 KV ({backend}): max |error| {error.max():.2e}, mean {error.mean():.2e}")
    # Unit-normal K/V, per-token scales: each value within half a step of 1/127 of its row's largest.
    assert float(error.max()) < 3e-2 and float(error.mean()) < 4e-3


@pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")
def test_fp8_kv_through_the_reference(rng: torch.Generator) -> None:
    assert FP8 is not None
    store = make_store(rng, [33, 12], [2, 1], kv_dtype=FP8)
    tol = tolerance(torch.float32)
    assert_close(run(store, "reference"), oracle(store), atol=tol.atol, rtol=tol.rtol, name="reference/fp8")
    if triton_interpreter_enabled():
        with pytest.raises(BackendUnavailableError, match="fp8"):
            run(store, "triton")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=INTERPRETED)])
def test_chunked_prefill_equals_contiguous_flash_attention(backend: str, rng: torch.Generator) -> None:
    """Equal-length sequences: a chunk over a cached prefix is flash_attention_forward on the gathered K/V."""
    prefix, chunk, batch = 27, 9, 2
    store = make_store(rng, [prefix + chunk] * batch, [chunk] * batch, page_size=8, heads=4, kv_heads=2)
    k = torch.stack(store.keys).float()
    v = torch.stack(store.values).float()
    q = store.q.view(batch, chunk, 4, 64)
    for options in ({"causal": True}, {"causal": True, "window_size": (11, -1), "softcap": 8.0}):
        want = flash_attention_forward(q, k, v, backend="reference", **options)
        got = run(store, backend, **options).view(batch, chunk, 4, 64)
        tol = tolerance(torch.float32)
        assert_close(got, want, atol=tol.atol, rtol=tol.rtol, name=f"{backend}/chunked {options}")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=INTERPRETED)])
def test_out_is_written_in_place_and_decode_is_one_query_per_sequence(backend: str, rng: torch.Generator) -> None:
    store = make_store(rng, [31, 4, 17], [1, 1, 1])
    out = torch.full_like(store.q, float("nan"))
    got = run(store, backend, out=out)
    assert got.data_ptr() == out.data_ptr()
    decoded = paged_decode(store.q, store.kv, store.block_tables, store.seq_lens, backend=backend)
    tol = tolerance(torch.float32)
    assert_close(out, oracle(store), atol=tol.atol, rtol=tol.rtol, name=f"{backend}/out")
    assert_close(decoded, out, name=f"{backend}/paged_decode")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=INTERPRETED)])
def test_slots_past_each_length_are_never_used(backend: str, rng: torch.Generator) -> None:
    """Uninitialised memory (NaN here) in the tail of a sequence's last block or in unused blocks stays unseen."""
    store = make_store(rng, [21, 3, 16], [2, 1, 1], page_size=8, spare_blocks=2)
    used = torch.zeros(store.kv.key_cache.shape[:2], dtype=torch.bool)
    for i, n in enumerate(store.seq_lens.tolist()):
        for t in range(n):
            used[int(store.block_tables[i, t // 8]), t % 8] = True
    store.kv.key_cache[~used] = float("nan")
    store.kv.value_cache[~used] = float("nan")
    tol = tolerance(torch.float32)
    assert_close(run(store, backend), oracle(store), atol=tol.atol, rtol=tol.rtol, name=f"{backend}/nan tails")


def test_automatic_choice_on_cpu(rng: torch.Generator) -> None:
    store = make_store(rng, [20, 3], [1, 1])
    with record_selections() as record:
        run(store, None)
    assert record.last("paged_attention") == ("triton" if triton_interpreter_enabled() else "reference")


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    page_size=st.sampled_from([1, 2, 3, 8, 16]),
    group=st.sampled_from([1, 2, 3, 4]),
    kv_heads=st.integers(1, 2),
    causal=st.booleans(),
    left=st.integers(-1, 12),
)
def test_reference_on_random_layouts(
    data: st.DataObject, page_size: int, group: int, kv_heads: int, causal: bool, left: int
) -> None:
    """Property: for any lengths, page size, grouping and window, the reference is attention over gathered K/V."""
    batch = data.draw(st.integers(1, 4))
    seq_lens = data.draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch))
    q_lens = [data.draw(st.integers(1, max(1, n))) for n in seq_lens]
    seed = data.draw(st.integers(0, 2**31 - 1))
    store = make_store(
        torch.Generator().manual_seed(seed),
        seq_lens,
        q_lens,
        page_size=page_size,
        heads=group * kv_heads,
        kv_heads=kv_heads,
        head_dim=8,
        spare_blocks=data.draw(st.integers(0, 3)),
    )
    window = None if left < 0 else (left, -1)
    out = run(store, "reference", causal=causal, window_size=window)
    tol = tolerance(torch.float32)
    assert_close(out, oracle(store, causal=causal, window_size=window), atol=tol.atol, rtol=tol.rtol, name="property")


# --- GPU ---------------------------------------------------------------------------------------------------------


def _gpu_check(store: Store, name: str, **options: object) -> None:
    cuda = store.to("cuda")
    with record_selections() as record:
        out = run(cuda, "triton", **options)
    assert record.last("paged_attention") == "triton"
    tol = tolerance(store.q.dtype)
    assert_close(out, oracle(store, **options), atol=tol.atol, rtol=tol.rtol, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gpu_kernel_matches_the_reference(case: Case, dtype: torch.dtype, rng: torch.Generator) -> None:
    from llamatelemetry_core.device import get_device_info

    if dtype == torch.bfloat16 and not get_device_info().supports_bf16:
        pytest.skip("no bf16 on this GPU")
    big = case.scaled(16)
    _gpu_check(big.store(rng, dtype), f"gpu/{case.name}/{dtype}", **big.options())


@pytest.mark.gpu
@pytest.mark.parametrize("device_key", ["t4", "a100", "h100"])
@pytest.mark.parametrize("rows", [None, 4], ids=["prefill-tiles", "decode-tiles"])
def test_gpu_each_devices_tiles_and_forced_splits(device_key: str, rows: int | None, rng: torch.Generator) -> None:
    """The tiles chosen for a T4 (and A100, H100), with and without split-KV, on whatever GPU is here."""
    from llamatelemetry_core.device import get_device_info, simulate_device
    from llamatelemetry_flashattn.paged_tiles import PagedLaunch, choose_paged_tiles

    store = make_store(rng, [700, 33, 1, 1024], [1, 5, 1, 40], heads=8, kv_heads=2, head_dim=128, dtype=torch.float16)
    cuda = store.to("cuda")
    with simulate_device(device_key) as target:
        tiles = choose_paged_tiles(128, torch.float16, torch.float16, target, rows_per_program=rows)
    if tiles.shared_memory_estimate(2, 2) > (get_device_info().shared_memory_per_block_bytes or 0):
        pytest.skip(f"{device_key}'s tiles need more shared memory than this GPU has")
    for splits in (1, 4, 7):
        out = launched(cuda, PagedLaunch(tiles, splits), causal=True, window_size=(300, -1))
        tol = tolerance(torch.float16)
        want = oracle(store, causal=True, window_size=(300, -1))
        assert_close(out, want, atol=tol.atol, rtol=tol.rtol, name=f"{device_key}/{rows}/splits={splits}")


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int8], ids=["fp16", "int8"])
@pytest.mark.parametrize("shape", [(16, 64, 4, 3), (16, 128, 4, 3), (128, 32, 4, 3), (64, 64, 4, 2)])
def test_gpu_one_block_id_per_page(
    shape: tuple[int, int, int, int], kv_dtype: torch.dtype, rng: torch.Generator
) -> None:
    """The per-page address path at the sizes the benchmark sweeps, page 16, with and without split-KV."""
    from llamatelemetry_core.device import get_device_info
    from llamatelemetry_flashattn.paged_tiles import PagedLaunch, PagedTiles

    tiles = PagedTiles(*shape[:2], 128, *shape[2:], page_ids=True)
    if tiles.shared_memory_estimate(2, kv_dtype.itemsize) > (get_device_info().shared_memory_per_block_bytes or 0):
        pytest.skip("these tiles need more shared memory than this GPU has")
    store = make_store(
        rng,
        [700, 33, 1, 1024],
        [1, 5, 1, 40],
        heads=8,
        kv_heads=2,
        head_dim=128,
        dtype=torch.float16,
        kv_dtype=kv_dtype,
    )
    cuda = store.to("cuda")
    for splits in (1, 4):
        out = launched(cuda, PagedLaunch(tiles, splits), causal=True)
        tol = tolerance(torch.float16)
        assert_close(out, oracle(store, causal=True), atol=tol.atol, rtol=tol.rtol, name=f"{shape}/splits={splits}")


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", [torch.float16, torch.int8], ids=["fp16", "int8"])
def test_gpu_head_dim_64_decode_launches(kv_dtype: torch.dtype, rng: torch.Generator) -> None:
    """Hopper's head-dim-64 decode rows (64-key single-stage tiles split one tile per part for short key ranges,
    128-key 2-stage tiles for long ones, one block id per page), forced on any GPU they fit, and the automatic
    launch, on ragged sequences of one query each."""
    from llamatelemetry_core.device import get_device_info
    from llamatelemetry_flashattn.paged_tiles import PagedLaunch, PagedTiles

    store = make_store(
        rng, [192, 1, 77, 500], [1, 1, 1, 1], heads=32, kv_heads=8, head_dim=64, dtype=torch.float16, kv_dtype=kv_dtype
    )
    cuda = store.to("cuda")
    limit = get_device_info().shared_memory_per_block_bytes or 0
    launches: list[PagedLaunch | None] = [None]
    for tiles, splits in (((64, 1), (1, 8)), ((128, 2), (1, 3))):
        t = PagedTiles(16, tiles[0], 64, 4, tiles[1], page_ids=True)
        if t.shared_memory_estimate(2, kv_dtype.itemsize) <= limit:
            launches += [PagedLaunch(t, n) for n in splits]
    want = oracle(store, causal=True)
    tol = tolerance(torch.float16)
    for launch in launches:
        out = launched(cuda, launch, causal=True)
        assert_close(out, want, atol=tol.atol, rtol=tol.rtol, name=f"{kv_dtype}/{launch}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kv_name", ["int8", "fp8"])
def test_gpu_quantized_kv(kv_name: str, dtype: torch.dtype, rng: torch.Generator) -> None:
    from llamatelemetry_core.device import get_device_info
    from llamatelemetry_core.errors import CapabilityError

    kv_dtype = torch.int8 if kv_name == "int8" else FP8
    if kv_dtype is None:
        pytest.skip("this torch has no float8_e4m3fn")
    if dtype == torch.bfloat16 and not get_device_info().supports_bf16:
        pytest.skip("no bf16 on this GPU")
    store = make_store(rng, [300, 64, 129, 5], [1, 1, 7, 2], heads=8, kv_heads=2, kv_dtype=kv_dtype, dtype=dtype)
    if kv_name == "fp8" and not get_device_info().supports_fp8:
        with pytest.raises(CapabilityError, match=r"8\.9"):
            run(store.to("cuda"), None)
        return
    _gpu_check(store, f"gpu/{kv_name}/{dtype}")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay(rng: torch.Generator) -> None:
    """A decode step captured once replays with new metadata and queries written into its static buffers."""
    batch, heads, kv_heads, page_size = 3, 8, 2, 16
    # Long enough for split-KV on any GPU: the partial buffers are allocated inside the capture too.
    first = make_store(rng, [1000, 7, 2000], [1] * batch, heads=heads, kv_heads=kv_heads, dtype=torch.float16)
    width = first.block_tables.shape[1]
    static = first.to("cuda")
    out = torch.empty_like(static.q)

    def step() -> None:
        paged_attention(
            static.q,
            static.kv,
            static.block_tables,
            static.seq_lens,
            static.cu_seqlens_q,
            max_seqlen_q=1,
            out=out,
        )

    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # Another step: other lengths (same block-table width), other blocks, other queries, same addresses.
    blocks = static.kv.key_cache.shape[0]
    lens = [int(torch.randint(1, width * page_size + 1, (), generator=rng)) for _ in range(batch)]
    tables = torch.stack([torch.randperm(blocks, generator=rng)[:width] for _ in range(batch)]).to(torch.int32)
    static.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
    static.block_tables.copy_(tables)
    static.q.copy_(torch.randn(static.q.shape, generator=rng).half())
    graph.replay()
    torch.cuda.synchronize()
    want = paged_attention(
        static.q.cpu().float(),
        PagedKV(static.kv.key_cache.cpu().float(), static.kv.value_cache.cpu().float()),
        tables,
        torch.tensor(lens, dtype=torch.int32),
        static.cu_seqlens_q.cpu(),
        max_seqlen_q=1,
        backend="reference",
    )
    tol = tolerance(torch.float16)
    assert_close(out, want, atol=tol.atol, rtol=tol.rtol, name="graph replay")


@interpreted
@settings(max_examples=8, deadline=None)
@given(
    data=st.data(),
    page_size=st.sampled_from([1, 3, 8, 16, 32]),
    group=st.sampled_from([1, 3, 4]),
    splits=st.integers(1, 4),
    left=st.integers(-1, 20),
    softcap=st.sampled_from([None, 6.0]),
)
def test_triton_on_random_layouts(
    data: st.DataObject, page_size: int, group: int, splits: int, left: int, softcap: float | None
) -> None:
    """Property: any page size (powers of two or not), grouping, split count and window match the reference."""
    from llamatelemetry_flashattn.paged_tiles import PagedLaunch, PagedTiles

    batch = data.draw(st.integers(1, 3))
    seq_lens = data.draw(st.lists(st.integers(0, 50), min_size=batch, max_size=batch))
    q_lens = [data.draw(st.integers(1, max(1, min(n, 6)))) for n in seq_lens]
    store = make_store(
        torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1))),
        seq_lens,
        q_lens,
        page_size=page_size,
        heads=group,
        kv_heads=1,
        head_dim=16,
    )
    window = None if left < 0 else (left, -1)
    out = launched(
        store, PagedLaunch(PagedTiles(16, 16, 16, 4, 1), splits), causal=True, window_size=window, softcap=softcap
    )
    tol = tolerance(torch.float32)
    want = oracle(store, causal=True, window_size=window, softcap=softcap)
    assert_close(out, want, atol=tol.atol, rtol=tol.rtol, name="triton/property")
