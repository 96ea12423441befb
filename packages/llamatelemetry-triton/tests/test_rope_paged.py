"""RoPE and the paged KV store in one launch: against its reference (rope reference + paged write), against the
two calls it replaces, its refusals, its custom ops, and (GPU) inside a replayed CUDA graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch

import llamatelemetry_triton as lt
from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.kv_layout import PAD_SLOT, PagedKV
from llamatelemetry_core.selection import record_selections
from llamatelemetry_core.testing import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OP = "triton.rope_paged_write"


@dataclass(frozen=True)
class Case:
    tokens: int
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int
    page_size: int
    interleaved: bool = False
    padded: int = 0  # tokens of the step whose slot is PAD_SLOT


CASES = {
    "decode_mqa_d64": Case(1, 4, 1, 64, 64, 16),
    "gqa3_d128_odd_tokens": Case(7, 6, 2, 128, 128, 16, padded=2),
    "mha_d80_page5": Case(5, 3, 3, 80, 80, 5, padded=1),
    "partial_rotary_gptj": Case(3, 4, 2, 48, 32, 16, interleaved=True),
    "gqa2_d64_page7_gptj": Case(9, 4, 2, 64, 64, 7, interleaved=True, padded=3),
}
MAX_POSITIONS = 100


Args = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PagedKV, torch.Tensor]
"""``q, k, v, cos, sin, positions, cache, slot_mapping``: a call's arguments."""


def _step(case: Case, dtype: torch.dtype, seed: int, device: torch.device = DEVICE) -> Args:
    """``q, k, v`` (slices of one QKV projection), tables, positions, a store filled with noise, slots."""
    gen = torch.Generator().manual_seed(seed)
    t, d = case.tokens, case.head_dim
    qkv = torch.randn(t, (case.heads + 2 * case.kv_heads) * d, generator=gen).to(device, dtype)
    hq, hk = case.heads * d, case.kv_heads * d
    q, k, v = qkv[:, :hq], qkv[:, hq : hq + hk], qkv[:, hq + hk :]
    cos, sin = lt.rope_cos_sin(MAX_POSITIONS, case.rotary_dim, device=device)
    # Positions well past the first rows of the tables, as in a long decode.
    positions = torch.randint(MAX_POSITIONS // 2, MAX_POSITIONS, (t,), generator=gen).to(device)
    num_blocks = -(-2 * t // case.page_size) + 1
    shape = (num_blocks, case.page_size, case.kv_heads, d)
    cache = PagedKV(
        torch.randn(shape, generator=gen).to(device, dtype), torch.randn(shape, generator=gen).to(device, dtype)
    )
    slots = torch.randperm(num_blocks * case.page_size, generator=gen)[:t]
    slots[torch.randperm(t, generator=gen)[: case.padded]] = PAD_SLOT
    return q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d), cos, sin, positions, cache, slots.to(device)


def _clone(args: Args) -> Args:
    q, k, v, cos, sin, positions, cache, slots = args
    stores = PagedKV(cache.key_cache.clone(), cache.value_cache.clone())
    return q.clone(), k.clone(), v.clone(), cos.clone(), sin.clone(), positions.clone(), stores, slots.clone()


def _check_same(got: Args, want: Args, dtype: torch.dtype, exact: bool) -> None:
    names = ("q", "k", "v", "cos", "sin", "positions", "cache", "slots")
    for name, a, b in zip(names, got, want, strict=True):
        pairs = (
            [(f"{name}.key_cache", a.key_cache, b.key_cache), (f"{name}.value_cache", a.value_cache, b.value_cache)]
            if isinstance(a, PagedKV) and isinstance(b, PagedKV)
            else [(name, a, b)]
        )
        for label, x, y in pairs:
            assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
            if exact:
                assert torch.equal(x, y), label
            else:
                assert_close(x, y, dtype=dtype, name=label)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_the_reference(name: str, dtype: torch.dtype) -> None:
    case = CASES[name]
    args = _step(case, dtype, seed=len(name))
    want = _clone(args)
    lt.rope_paged_write_reference(*want, interleaved=case.interleaved)
    before = _clone(args)
    with record_selections() as rec:
        q, k = lt.triton_rope_paged_write(*args, interleaved=case.interleaved)
    assert q is args[0] and k is args[1]
    _check_same(args, want, dtype, exact=False)
    cache, slots = args[6], args[7]
    old = before[6]
    # A padding token stores nothing: every row no kept slot names still holds its noise, bit for bit.
    untouched = torch.ones(cache.key_cache.shape[0] * case.page_size, dtype=torch.bool, device=DEVICE)
    untouched[slots[slots >= 0]] = False
    for store, noise in ((cache.key_cache, old.key_cache), (cache.value_cache, old.value_cache)):
        assert torch.equal(store.flatten(0, 1)[untouched], noise.flatten(0, 1)[untouched])
    interpreted = triton_interpreter_enabled() and dtype != torch.bfloat16  # the interpreter has no bf16
    triton_runs = lt.HAS_TRITON and (DEVICE.type == "cuda" or interpreted)
    assert rec.last(OP) == ("triton" if triton_runs else "reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_rounds_exactly_as_triton_rope_and_stores_what_it_rotated(name: str, dtype: torch.dtype) -> None:
    # One rotation function serves both kernels: the fused call's q and k are triton_rope's to the bit, and the
    # store holds exactly the rotated keys and the values.
    case = CASES[name]
    args = _step(case, dtype, seed=3 * len(name))
    q, k, v, cos, sin, positions, cache, slots = _clone(args)
    lt.triton_rope(q, k, cos, sin, positions, interleaved=case.interleaved)
    kept = slots >= 0
    cache.key_cache.view(-1, case.kv_heads, case.head_dim)[slots[kept]] = k[kept]
    cache.value_cache.view(-1, case.kv_heads, case.head_dim)[slots[kept]] = v[kept]
    lt.triton_rope_paged_write(*args, interleaved=case.interleaved)
    _check_same(args, (q, k, v, cos, sin, positions, cache, slots), dtype, exact=True)


def test_a_strided_slot_mapping_is_read_slot_by_slot() -> None:
    # A column of a wider tensor (stride 2): each token's own slot, not its neighbour's.
    case = CASES["gqa3_d128_odd_tokens"]
    args = _step(case, torch.float32, seed=11)
    slots = args[7]
    wide = torch.stack([slots, torch.full_like(slots, 10**6)], dim=1)
    strided = (*args[:7], wide[:, 0])
    assert strided[7].stride() == (2,)
    want = _clone(args)
    lt.rope_paged_write_reference(*want)
    lt.triton_rope_paged_write(*strided)
    _check_same(strided, (*want[:7], wide[:, 0]), torch.float32, exact=False)


def test_a_step_of_padding_alone_rotates_and_stores_nothing() -> None:
    args = _step(Case(4, 2, 1, 64, 64, 16, padded=4), torch.float32, seed=1)
    before = _clone(args)
    lt.triton_rope_paged_write(*args)
    cache, old = args[6], before[6]
    assert torch.equal(cache.key_cache, old.key_cache) and torch.equal(cache.value_cache, old.value_cache)
    assert not torch.equal(args[0], before[0])  # q is rotated all the same


def test_no_tokens_is_a_no_op() -> None:
    q, k, v, cos, sin, _, cache, _ = _step(Case(1, 2, 1, 16, 16, 4), torch.float32, seed=2)
    none = torch.empty(0, dtype=torch.int64, device=DEVICE)
    out_q, _ = lt.triton_rope_paged_write(q[:0], k[:0], v[:0], cos, sin, none, cache, none)
    assert out_q.shape == (0, 2, 16)


def _refusal_args(**change: object) -> tuple[Any, ...]:
    q, k, v, cos, sin, positions, cache, slots = _step(Case(3, 4, 2, 16, 16, 4), torch.float16, seed=5)
    values: dict[str, object] = {
        "q": q,
        "k": k,
        "v": v,
        "cos": cos,
        "sin": sin,
        "positions": positions,
        "cache": cache,
        "slots": slots,
    }
    values.update(change)
    return tuple(values.values())


def test_a_quantized_store_is_refused_with_the_reason() -> None:
    shape = (4, 4, 2, 16)
    int8 = PagedKV(
        torch.zeros(shape, dtype=torch.int8, device=DEVICE),
        torch.zeros(shape, dtype=torch.int8, device=DEVICE),
        torch.ones(shape[:3], device=DEVICE),
        torch.ones(shape[:3], device=DEVICE),
    )
    args = _refusal_args(cache=int8)
    q, k, v = args[:3]
    reason = lt.rope_paged_write_refusal(q, k, v, int8)
    assert reason is not None and "int8 with scales" in reason
    before = q.clone()
    with pytest.raises(ConfigurationError, match=r"int8 with scales.*call triton_rope and then the cache's write"):
        lt.triton_rope_paged_write(*args)
    assert torch.equal(q, before)  # refused before anything is written


def test_a_store_of_another_dtype_is_refused_with_the_reason() -> None:
    shape = (4, 4, 2, 16)
    fp32 = PagedKV(torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE))
    args = _refusal_args(cache=fp32)
    q, k, v = args[:3]
    assert lt.rope_paged_write_refusal(q, k, v, fp32) == (
        "the store is float32 and q, k, v are float16: the kernel stores them as they are"
    )
    assert lt.rope_paged_write_refusal(q, k, v, PagedKV(fp32.key_cache.half(), fp32.value_cache.half())) is None
    with pytest.raises(ConfigurationError, match="does not take this call: the store is float32"):
        lt.triton_rope_paged_write(*args)


def test_bad_calls_name_what_to_change() -> None:
    q, k, v, *_ = _refusal_args()
    cases: list[tuple[dict[str, object], str]] = [
        ({"v": v[:, :1]}, r"k, v \[tokens, 2, 16\]"),
        ({"slots": torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)}, "slot_mapping as int64 \\[3\\]"),
        ({"slots": torch.tensor([0, 1], device=DEVICE)}, "slot_mapping as int64 \\[3\\]"),
        ({"q": q.transpose(1, 2).contiguous().transpose(1, 2)}, "q with unit feature stride"),
        ({"cache": "not a store"}, "PagedKV"),
        ({"positions": torch.tensor([0, 1, 2.0], device=DEVICE)}, "integer tensor"),
    ]
    if DEVICE.type == "cpu":
        cases.append(({"slots": torch.tensor([0, 99, 2], device=DEVICE)}, r"slots in \[0, 12\)"))
        cases.append(({"positions": torch.tensor([0, 1, 200], device=DEVICE)}, r"positions in \[0, 100\)"))
    for change, match in cases:
        with pytest.raises((ConfigurationError, TypeError), match=match):
            lt.triton_rope_paged_write(*_refusal_args(**change))
    shared = list(_refusal_args())
    shared[2] = shared[1]  # v is k
    with pytest.raises(ConfigurationError, match=r"k and v in separate memory.*pass v\.clone\(\)"):
        lt.triton_rope_paged_write(*shared)
    grad_q = q.float().requires_grad_(True)
    fp32 = PagedKV(torch.zeros(4, 4, 2, 16, device=DEVICE), torch.zeros(4, 4, 2, 16, device=DEVICE))
    with pytest.raises(ConfigurationError, match="do not require grad"):
        lt.triton_rope_paged_write(*_refusal_args(q=grad_q, k=k.float(), v=v.float(), cache=fp32))


@pytest.mark.triton
def test_the_custom_ops_pass_opcheck() -> None:
    q, k, v, cos, sin, positions, cache, slots = _step(CASES["gqa3_d128_odd_tokens"], torch.float32, seed=8)
    store = (cache.key_cache, cache.value_cache, slots)
    checks = ("test_schema", "test_faketensor")
    launch = (q, k, v, cos, sin, positions, *store, False)
    torch.library.opcheck(torch.ops.llamatelemetry.triton_rope_paged_write_, launch, test_utils=checks)
    whole = (q, k, v, cos, sin, positions, *store, False, "")
    torch.library.opcheck(torch.ops.llamatelemetry.rope_paged_write, whole, test_utils=checks)


@pytest.mark.gpu
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_decode_shapes_on_a_gpu_equal_the_two_calls(batch: int, dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("bfloat16 needs compute capability >= 8.0")
    case = Case(batch, 32, 8, 128, 128, 16, padded=batch // 8)
    args = _step(case, dtype, seed=batch)
    q, k, v, cos, sin, positions, cache, slots = _clone(args)
    lt.triton_rope(q, k, cos, sin, positions)
    kept = slots >= 0
    cache.key_cache.view(-1, 8, 128)[slots[kept]] = k[kept]
    cache.value_cache.view(-1, 8, 128)[slots[kept]] = v[kept]
    with record_selections() as rec:
        lt.triton_rope_paged_write(*args)
    assert rec.last(OP) == "triton"
    _check_same(args, (q, k, v, cos, sin, positions, cache, slots), dtype, exact=True)
    want = _step(case, dtype, seed=batch)
    lt.rope_paged_write_reference(*want)
    _check_same(args, want, dtype, exact=False)


@pytest.mark.gpu
@pytest.mark.triton
def test_replayed_in_a_cuda_graph_with_new_positions_and_slots() -> None:
    case = Case(8, 32, 8, 128, 128, 16, padded=2)
    static = _step(case, torch.float16, seed=0)
    lt.triton_rope_paged_write(*_clone(static))  # compile before capturing
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lt.triton_rope_paged_write(*static)
    for seed in (1, 2):
        fresh = _step(case, torch.float16, seed=seed)  # other values, positions, slots and padding
        for target, value in zip(static, fresh, strict=True):
            if isinstance(target, PagedKV) and isinstance(value, PagedKV):
                target.key_cache.copy_(value.key_cache)
                target.value_cache.copy_(value.value_cache)
            elif isinstance(target, torch.Tensor) and isinstance(value, torch.Tensor):
                target.copy_(value)
        graph.replay()
        lt.triton_rope_paged_write(*fresh)
        _check_same(static, fresh, torch.float16, exact=True)
