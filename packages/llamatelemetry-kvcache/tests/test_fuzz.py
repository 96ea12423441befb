"""Fuzzing the KV caches and the block manager with hostile inputs (see ``llamatelemetry_core.testing.fuzz``).

* :class:`KVCache`: steps of drawn updates (ragged counts, explicit host or device positions, wrong shapes,
  dtypes, devices, batches and capacities) against a plain model of what every position holds; a refused call
  writes nothing, and positions never written read back as zeros even when the storage starts out as NaN (the
  operating system hands out dirty memory too).
* :class:`PagedKVCache`: writes through drawn slot mappings (padding, out-of-range and wrong-typed slots) read back
  with ``gather`` against a per-sequence reference.
* Quantized storage (int8, fp8 e4m3 where PyTorch has it): within the documented error (half a step for int8, 1/16
  relative for e4m3), and a head holding NaN or an infinity reads back as NaN, never as finite values.
* The block manager and the step metadata: ``test_fuzz_block_manager.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamatelemetry_core.device import get_device_info
from llamatelemetry_core.kv_layout import PAD_SLOT
from llamatelemetry_core.testing.fuzz import TensorSpec, check_call, fuzz_settings, make_tensor, tensor_specs
from llamatelemetry_kvcache import KVCache, KVCacheConfig, PagedKVCache, dequantize_kv, quantize_kv

FP8 = getattr(torch, "float8_e4m3fn", None)
MODEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STORAGE = ["same", "int8"] + (["fp8"] if FP8 is not None else [])
KV_ARGS = ["new_keys", "new_values", "positions", "num_new_tokens", "layer_idx", "max_seq_length", "max_batch_size"]
SPECS = tensor_specs(MODEL_DTYPES, layouts=("contiguous", "transposed", "expanded", "sliced"))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _kv_dtype(storage: str, dtype: torch.dtype) -> torch.dtype | None:
    return {"same": None, "int8": torch.int8, "fp8": FP8}[storage]


def _on_device(device: str, dtype: torch.dtype, storage: str) -> tuple[torch.dtype, str]:
    """The drawn dtypes, or the nearest ones this GPU holds (fp16 for bf16, int8 for fp8 on older GPUs)."""
    if device == "cuda":
        info = get_device_info("cuda")
        if dtype == torch.bfloat16 and not info.supports_bf16:
            dtype = torch.float16
        if storage == "fp8" and not info.supports_fp8:
            storage = "int8"
    return dtype, storage


def assert_quantized_close(got: torch.Tensor, want: torch.Tensor, kv_dtype: torch.dtype, name: str) -> None:
    """``got`` (dequantized) is within the documented error of ``want``, head vector by head vector (last dim).

    int8: half a step, ``max|x| / 127 / 2``; e4m3: 1/16 of the value, plus a subnormal step of the scale. A head
    holding NaN or an infinity must read back as NaN throughout.
    """
    g, w = got.double().cpu(), want.double().cpu()
    bad = ~torch.isfinite(w).all(dim=-1, keepdim=True).expand_as(w)
    assert bool(g[bad].isnan().all()), f"{name}: a head holding NaN/inf must read back as NaN"
    amax = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0).abs().amax(dim=-1, keepdim=True)
    # int8: half a step; e4m3: 1/16 of the value, or a subnormal step of the scale near zero.
    bound = amax / 127 / 2 if kv_dtype == torch.int8 else w.abs() / 16 + amax / 448 * 2.0**-9
    out = torch.finfo(got.dtype)
    bound = bound * (1 + 1e-5) + w.abs() * out.eps + out.smallest_normal * out.eps
    ok = ((g - w).abs() <= bound) | bad
    if not bool(ok.all()):
        index = tuple(int(i) for i in (~ok).nonzero()[0])
        raise AssertionError(f"{name}: at {index} got {g[index].item()}, expected {w[index].item()} within the bound")


# --- KVCache --------------------------------------------------------------------------------------------------------


class CacheModel:
    """What every position of every layer of a contiguous cache holds, as the module docstring specifies."""

    def __init__(self, c: KVCacheConfig) -> None:
        shape = (c.num_layers, c.max_batch_size, c.max_seq_length, c.num_kv_heads, c.head_dim)
        self.keys = torch.zeros(shape, dtype=c.dtype)
        self.values = torch.zeros(shape, dtype=c.dtype)
        self.lengths = [0] * c.max_batch_size
        self.active = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, starts: list[int], counts: list[int]) -> None:
        for i, (start, count) in enumerate(zip(starts, counts, strict=True)):
            self.keys[layer, i, start : start + count] = k[i, :count]
            self.values[layer, i, start : start + count] = v[i, :count]

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        length = max(self.lengths[: self.active], default=0)
        if length == 0:
            return None
        return self.keys[layer, : self.active, :length], self.values[layer, : self.active, :length]


def _compare(got: Any, want: Any, config: KVCacheConfig, name: str) -> None:
    if want is None:
        assert got is None, f"{name}: expected None (nothing cached)"
        return
    assert got is not None, f"{name}: got None, expected tensors"
    for label, g, w in ((f"{name} keys", got[0].cpu(), want[0].cpu()), (f"{name} values", got[1].cpu(), want[1].cpu())):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{label}: {g.shape} {g.dtype}, expected {w.shape} {w.dtype}"
        if config.quantized:
            assert_quantized_close(g, w, config.kv_dtype, label)
        else:
            assert bool(((g == w) | (g.isnan() & w.isnan())).all()), f"{label}: differs from what was written"


FAULTS = {
    "positions": ["overflow", "negative", "float", "scalar"],
    "counts": ["zero", "too_many", "wrong_length", "with_tensor"],
    "shape": [
        "heads",
        "head_dim",
        "mismatch",
        "dtype",
        "none",
        "3d",
        "empty_batch",
        "no_tokens",
        "big_batch",
        "device",
    ],
    "layer": ["negative", "past", "str"],
}
# Most steps are valid (so that the cache fills up and later steps meet its state); the rest carry one fault.
STEP = st.fixed_dictionaries(
    {
        "fault": st.sampled_from(["none"] * 12 + sorted(FAULTS)),
        "kind": st.integers(0, 8),
        "batch": st.integers(1, 3),
        "width": st.integers(1, 3),
        "spec": SPECS,
        "positions": st.sampled_from(["none", "none", "list", "tensor"]),
        "ragged": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def _positions(kind: str, batch: int, width: int, lengths: list[int], max_len: int, g: torch.Generator) -> Any:
    if kind == "none":
        return None
    room = [max(0, max_len - width)] * batch
    starts = [int(torch.randint(0, r + 1, (1,), generator=g)) for r in room]
    return {
        "list": starts,
        "tensor": torch.tensor(starts, dtype=torch.int64),
        "overflow": [max_len - width + 1, *starts[1:]],
        "negative": [-1, *starts[1:]],
        "float": [float(s) for s in starts],
        "scalar": 0,
    }[kind]


def _counts(kind: str, batch: int, width: int, g: torch.Generator) -> Any:
    if kind == "none":
        return None
    ragged = [int(torch.randint(1, max(width, 1) + 1, (1,), generator=g)) for _ in range(batch)]
    return {
        "ragged": ragged,
        "zero": [0, *ragged[1:]],
        "too_many": [width + 1, *ragged[1:]],
        "wrong_length": [*ragged, 1],
    }[kind]


@fuzz_settings(ci=25)
@given(
    batch=st.integers(1, 3),
    seq=st.sampled_from([5, 8, 24, 40]),
    layers=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    head_dim=st.sampled_from([1, 3, 4, 8]),
    dtype=st.sampled_from(MODEL_DTYPES),
    storage=st.sampled_from(STORAGE),
    steps=st.lists(STEP, min_size=1, max_size=5),
)
def test_kv_cache_steps_equal_the_model(
    device: str,
    batch: int,
    seq: int,
    layers: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    storage: str,
    steps: list[dict[str, Any]],
) -> None:
    dtype, storage = _on_device(device, dtype, storage)
    kv_dtype = _kv_dtype(storage, dtype)
    config = KVCacheConfig(batch, seq, layers, kv_heads, head_dim, dtype=dtype, device=device, kv_dtype=kv_dtype)
    cache = KVCache(config)
    if device == "cpu":  # dirty memory (GPU storage is zeroed): whatever was never written must not show through
        for layer in range(layers):
            for t in cache.storage(layer):
                t.fill_(float("nan") if t.is_floating_point() else 1)
    model = CacheModel(config)
    for n, step in enumerate(steps):
        _run_step(cache, model, config, step, f"step {n}")
        for layer in range(layers):
            _compare(cache.get(layer), model.get(layer), config, f"get({layer}) after step {n}")
        assert cache.lengths == model.lengths


def _run_step(cache: KVCache, model: CacheModel, config: KVCacheConfig, step: dict[str, Any], name: str) -> None:
    g = torch.Generator().manual_seed(step["seed"])
    fault = step["fault"]
    hostile = FAULTS[fault][step["kind"] % len(FAULTS[fault])] if fault != "none" else "ok"
    b, width, spec = min(step["batch"], config.max_batch_size), step["width"], step["spec"]
    b = {"empty_batch": 0, "big_batch": config.max_batch_size + 1}.get(hostile, b)
    width = 0 if hostile == "no_tokens" else width
    sizes = {
        "shape": hostile if fault == "shape" else "ok",
        "positions": step["positions"],
        "counts": "ragged" if step["ragged"] else "none",
    }
    if fault == "positions":
        sizes["positions"] = hostile
    if fault == "counts":
        sizes["counts"] = "ragged" if hostile == "with_tensor" else hostile
        sizes["positions"] = "tensor" if hostile == "with_tensor" else "list"
    elif sizes["positions"] == "tensor":
        sizes["counts"] = "none"  # ragged counts do not go with device positions
    step = {**step, **sizes, "layer": hostile if fault == "layer" else "ok"}
    heads, dim = config.num_kv_heads, config.head_dim
    shape: dict[str, list[int]] = {
        "heads": [b, width, heads + 1, dim],
        "head_dim": [b, width, heads, dim + 1],
        "3d": [b, width, heads],
    }
    k_dtype = config.dtype if step["shape"] != "dtype" else torch.float64
    k_spec = TensorSpec(k_dtype, spec.layout, spec.special, spec.seed)
    device = config.device
    k = make_tensor(shape.get(step["shape"], [b, width, heads, dim]), k_spec, device=device)
    v_shape = [b, width + 1, heads, dim] if step["shape"] == "mismatch" else list(k.shape)
    v = make_tensor(v_shape, TensorSpec(k.dtype, spec.layout, "none", spec.seed + 1), device=device)
    keys: Any = None if step["shape"] == "none" else k
    if step["shape"] == "device":  # K/V on another device than the cache's
        keys = torch.empty(k.shape, dtype=k.dtype, device="meta")
    positions = _positions(step["positions"], b, width, model.lengths, config.max_seq_length, g)
    if isinstance(positions, torch.Tensor):  # only valid device positions: a GPU checks them in the kernel
        positions = positions.to(device)
    counts = _counts(step["counts"], b, width, g)
    layer_of: dict[str, Callable[[int], object]] = {
        "ok": lambda i: i,
        "negative": lambda i: -1,
        "past": lambda i: config.num_layers,
        "str": lambda i: str(i),
    }
    # What the contract accepts: the model predicts the outcome, so a call that refuses valid input fails too.
    device_positions = isinstance(positions, torch.Tensor)
    starts = (
        positions.tolist() if device_positions else model.lengths[:b] if positions is None else positions
    )  # fmt: skip
    new_counts = [width] * b if counts is None else counts
    valid = (
        step["shape"] in ("ok", "empty_batch", "no_tokens", "big_batch")
        and step["layer"] == "ok"
        and 1 <= b <= config.max_batch_size
        and width >= 1
        and isinstance(starts, list)
        and len(starts) == b
        and all(type(s) is int and s >= 0 for s in starts)
        and isinstance(new_counts, list)
        and len(new_counts) == b
        and all(1 <= c <= width for c in new_counts)
        and all(s + c <= config.max_seq_length for s, c in zip(starts, new_counts, strict=False))
        and not (device_positions and counts is not None)
    )
    stores = {}
    for i in range(config.num_layers):
        stores.update({f"storage {i}.{j}": _raw(t) for j, t in enumerate(cache.storage(i))})
        stores.update({f"scales {i}.{j}": t for j, t in enumerate(cache.scales(i) or ())})
    lengths_before = cache.lengths
    for layer in range(config.num_layers):
        layer_idx = layer_of[step["layer"]](layer)
        # Each layer its own values; layer 0 keeps the drawn memory layout.
        lk, lv = (keys * (layer + 1), v * (layer + 1)) if keys is not None and layer else (keys, v)

        def call(layer_idx: object = layer_idx, lk: Any = lk, lv: Any = lv) -> Any:
            return cache.update(layer_idx, lk, lv, positions=positions, num_new_tokens=counts)  # type: ignore[arg-type]

        outcome = check_call(
            call,
            None,
            arguments=KV_ARGS,
            read_only=None if valid or layer else stores,  # a refused first layer writes nothing anywhere
            name=f"{name}, layer {layer}",
        )
        assert outcome.raised != valid, f"{name}: valid={valid} but raised={outcome.error!r}"
        if outcome.raised:
            assert cache.lengths == lengths_before, f"{name}: a refused update changed the lengths"
            return
        model.write(layer, lk.cpu(), lv.cpu(), starts, new_counts)
        if device_positions:
            want: Any = (model.keys[layer, :b], model.values[layer, :b])
        else:
            end = max(s + c for s, c in zip(starts, new_counts, strict=True))
            want = (model.keys[layer, :b, :end], model.values[layer, :b, :end])
        _compare(outcome.result, want, config, f"{name}, update of layer {layer}")
    if not device_positions:  # the graph-safe path leaves the host-side lengths alone
        for i, (s, c) in enumerate(zip(starts, new_counts, strict=True)):
            model.lengths[i] = s + c
        model.active = max(model.active, b)


@fuzz_settings(ci=30)
@given(
    lengths=st.one_of(
        st.lists(st.integers(-2, 10), max_size=4),
        st.lists(st.sampled_from([1.5, "3", None, True]), min_size=1, max_size=2),
        st.sampled_from([None, 3, "ab"]),
    ),
    batch=st.one_of(st.none(), st.integers(-1, 5), st.sampled_from([1.0, True])),
)
def test_kv_cache_state_calls(lengths: Any, batch: Any) -> None:
    config = KVCacheConfig(3, 8, 1, 1, 2, dtype=torch.float32, device="cpu")
    cache = KVCache(config)
    cache.update(0, torch.randn(3, 2, 1, 2), torch.randn(3, 2, 1, 2))
    before = cache.lengths
    outcome = check_call(lambda: cache.set_lengths(lengths), None, arguments=["lengths", "max_seq_length", "max_batch"])
    valid = (
        isinstance(lengths, list)
        and len(lengths) <= 3
        and all(type(x) is int and 0 <= x <= 8 for x in lengths)
    )  # fmt: skip
    assert outcome.raised != valid
    assert cache.lengths == (before if outcome.raised else lengths + before[len(lengths) :])
    outcome = check_call(lambda: cache.prepare_static(batch), None, arguments=["batch"])
    assert outcome.raised != (batch is None or (type(batch) is int and 0 <= batch <= 3))


# --- PagedKVCache ---------------------------------------------------------------------------------------------------


# The interpreter computes with NumPy, which warns about the NaN heads this test feeds on purpose.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@fuzz_settings(ci=20)
@given(
    page_size=st.integers(1, 4),
    kv_heads=st.integers(1, 2),
    head_dim=st.sampled_from([1, 4, 5]),
    dtype=st.sampled_from(MODEL_DTYPES),
    storage=st.sampled_from(STORAGE),
    prompts=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    spec=SPECS,
    hostile=st.sampled_from(
        ["none"] * 5 + ["slot_past", "slot_negative", "slot_int32", "value_dtype", "shape", "none_key"]
    ),
    pad=st.integers(0, 2),
)
def test_paged_writes_read_back_through_gather(
    device: str,
    page_size: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    storage: str,
    prompts: list[int],
    spec: TensorSpec,
    hostile: str,
    pad: int,
) -> None:
    if device == "cuda" and hostile in ("slot_past", "slot_negative"):
        hostile = "none"  # a GPU does not range-check slots (it would synchronise): the contract is the caller's
    dtype, storage = _on_device(device, dtype, storage)
    kv_dtype = _kv_dtype(storage, dtype)
    config = KVCacheConfig(len(prompts), 12, 2, kv_heads, head_dim, dtype=dtype, device=device, kv_dtype=kv_dtype)
    cache = PagedKVCache(config, page_size)
    manager = cache.block_manager
    for i, n in enumerate(prompts):
        manager.allocate(i, list(range(n)))
    spans = [(i, 0, n) for i, n in enumerate(prompts)]
    total = sum(prompts)
    slots = cache.slot_mapping(spans, pad_to=total + pad)
    shape = [total + pad, kv_heads, head_dim]
    keys = make_tensor(shape, TensorSpec(dtype, spec.layout, spec.special, spec.seed), device=device)
    values = make_tensor(shape, TensorSpec(dtype, spec.layout, "none", spec.seed + 1), device=device)
    args: dict[str, Any] = {"keys": keys, "values": values, "slot_mapping": slots}
    rows, first = cache.num_blocks * page_size, torch.tensor([0], device=device)
    if hostile == "slot_past":
        args["slot_mapping"] = slots.clone().index_fill_(0, first, rows)
    elif hostile == "slot_negative":
        args["slot_mapping"] = slots.clone().index_fill_(0, first, PAD_SLOT - 1)
    elif hostile == "slot_int32":
        args["slot_mapping"] = slots.int()
    elif hostile == "value_dtype":
        args["values"] = values.double()
    elif hostile == "shape":
        args["values"] = values[:, :, :0]
    elif hostile == "none_key":
        args["keys"] = None
    layers = [cache.layer(i) for i in range(2)]
    stores = {
        f"layer {i} {name}": _raw(t)
        for i, store in enumerate(layers)
        for name, t in (("keys", store.key_cache), ("values", store.value_cache), ("key scales", store.key_scale))
        if t is not None
    }
    for layer in range(2):

        def write(layer: int = layer) -> None:
            cache.write(layer, _scaled(args["keys"], layer), args["values"], args["slot_mapping"])

        outcome = check_call(
            write,
            None,
            arguments=["keys", "values", "key", "value", "slot_mapping"],
            read_only=None if hostile == "none" else stores,
            name=f"write of layer {layer}",
        )
        assert outcome.raised != (hostile == "none"), f"hostile={hostile}, raised={outcome.error!r}"
        if outcome.raised:
            return
    offset = 0
    for i, n in enumerate(prompts):
        for layer in range(2):
            got = cache.gather(i, layer)
            want = (keys[offset : offset + n] * (layer + 1), values[offset : offset + n])
            _compare(got, want, config, f"sequence {i}, layer {layer}")
        offset += n


def _scaled(t: torch.Tensor | None, layer: int) -> Any:
    return t * (layer + 1) if t is not None and layer else t


def _raw(t: torch.Tensor) -> torch.Tensor:
    """One-byte storage viewed as uint8 (the CPU has no comparisons of float8), others as they are."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


# --- quantization ---------------------------------------------------------------------------------------------------


@fuzz_settings(ci=40)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    spec=tensor_specs(MODEL_DTYPES, special_weight=0.6),
    storage=st.sampled_from([s for s in STORAGE if s != "same"]),
)
def test_quantized_storage_is_within_its_documented_error(
    device: str, shape: list[int], spec: TensorSpec, storage: str
) -> None:
    dtype, storage = _on_device(device, spec.dtype, storage)
    spec = TensorSpec(dtype, spec.layout, spec.special, spec.seed)
    x = make_tensor(shape, spec, device=device)
    kv_dtype = _kv_dtype(storage, spec.dtype)
    assert kv_dtype is not None
    outcome = check_call(
        lambda: dequantize_kv(*quantize_kv(x, kv_dtype), spec.dtype), None, arguments=["x"], read_only={"x": x}
    )
    assert not outcome.raised
    assert_quantized_close(outcome.result, x, kv_dtype, "quantize -> dequantize")
