"""Fuzzing every public operation of the package with hostile inputs (see ``llamatelemetry_core.testing.fuzz``).

Each call gets drawn shapes, strides (transposed, expanded, sliced, channels-last), dtypes, aliasing and special
values (NaN, inf, -inf rows, fp16 extremes, tiny values), and must either match its reference within the shared
tolerance or raise a typed error naming an argument, without writing into inputs it only reads. Runs in every
matrix: through the Triton kernels where they run (a GPU, or the interpreter on CPU), through the references
otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st

import llamatelemetry_triton as lt
from llamatelemetry_core.testing.fuzz import TensorSpec, check_call, fuzz_settings, make_tensor, tensor_specs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ANY_DTYPE = [*FLOATS, torch.int32]
small_shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(lambda s: [*s[:-1], s[-1] * 3 + 1])


def _conditioning(x: torch.Tensor, w: torch.Tensor | None, eps: float) -> float:
    """How much one fp32 rounding of ``x`` can move a normalised output, in units of the fp32 tolerance.

    A near-constant row's centred values are rounding errors, amplified by ``1 / sqrt(var + eps)`` up to
    ``1 / sqrt(eps)``: any two correct fp32 implementations may differ by a few ulps of ``|x|`` times that.
    """
    if not eps > 0:
        return 1.0
    largest = float(x.detach().double().nan_to_num(0.0, 0.0, 0.0).abs().max()) if x.numel() else 0.0
    gain = 1.0 if w is None else float(w.detach().double().nan_to_num(0.0, 0.0, 0.0).abs().max())
    return 1.0 + 4 * 2.0**-24 * largest * gain / math.sqrt(eps) / 1e-5


def _t(shape: list[int], spec: TensorSpec) -> torch.Tensor:
    return make_tensor(shape, spec, device=DEVICE)


@fuzz_settings(ci=12)
@given(shape=small_shapes, spec_a=tensor_specs(ANY_DTYPE), spec_b=tensor_specs(ANY_DTYPE), alias=st.booleans())
def test_add(shape: list[int], spec_a: TensorSpec, spec_b: TensorSpec, alias: bool) -> None:
    a = _t(shape, spec_a)
    b = a if alias else _t(shape[-1:], spec_b)  # b broadcasts over a's rows
    check_call(
        lambda: lt.triton_add(a, b),
        lambda: lt.add_reference(a, b),
        arguments=["a", "b"],
        read_only={"a": a, "b": b},
        dtype=torch.result_type(a, b) if torch.result_type(a, b).is_floating_point else None,
        name="add",
    )


@fuzz_settings(ci=12)
@given(
    shape=small_shapes,
    spec=tensor_specs(ANY_DTYPE),
    affine=st.sampled_from(["none", "weight", "both", "bad_weight"]),
    rms=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-6, -1.0, float("nan")]),
)
def test_norms(shape: list[int], spec: TensorSpec, affine: str, rms: bool, eps: float) -> None:
    # eps = 0 is valid, but a constant row then normalises 0 / 0: ill-posed, so not drawn here.
    x = _t(shape, spec)
    n = shape[-1]
    w = None if affine == "none" else torch.randn(n + (affine == "bad_weight"), device=DEVICE).to(x.dtype)
    b = torch.randn(n, device=DEVICE).to(x.dtype) if affine == "both" and not rms else None
    read_only = {"x": x} | ({"weight": w} if w is not None else {})
    if rms:
        check_call(
            lambda: lt.triton_rmsnorm(x, w, eps),
            lambda: lt.rmsnorm_reference(x, w, eps),
            arguments=["x", "weight", "eps"],
            read_only=read_only,
            scale=lambda _: _conditioning(x, w, eps),
            name="rmsnorm",
        )
    else:
        check_call(
            lambda: lt.triton_layernorm(x, w, b, eps),
            lambda: lt.layernorm_reference(x, w, b, eps),
            arguments=["x", "weight", "bias", "eps"],
            read_only=read_only,
            scale=lambda _: _conditioning(x, w, eps),
            name="layernorm",
        )


@fuzz_settings(ci=10)
@given(
    shape=small_shapes,
    spec_x=tensor_specs(FLOATS),
    spec_r=tensor_specs(FLOATS),
    residual=st.sampled_from(["tensor", "same", "none", "wrong_shape"]),
    rms=st.booleans(),
)
def test_fused_add_norms(shape: list[int], spec_x: TensorSpec, spec_r: TensorSpec, residual: str, rms: bool) -> None:
    x = _t(shape, spec_x)
    r: torch.Tensor | None = None
    if residual == "tensor":
        r = _t(shape, spec_r)
    elif residual == "same":
        r = x
    elif residual == "wrong_shape":
        r = _t([*shape[:-1], shape[-1] + 1], spec_r)
    w = torch.randn(shape[-1], device=DEVICE).to(x.dtype)
    read_only = {"x": x, "weight": w} | ({"residual": r} if r is not None else {})
    if rms:
        check_call(
            lambda: lt.triton_fused_add_rmsnorm(x, r, w),  # type: ignore[arg-type]
            lambda: lt.fused_add_rmsnorm_reference(x, r, w),  # type: ignore[arg-type]
            arguments=["x", "residual", "weight"],
            read_only=read_only,
            name="fused_add_rmsnorm",
        )
    else:
        check_call(
            lambda: lt.triton_fused_add_layernorm(x, r, w),  # type: ignore[arg-type]
            lambda: lt.fused_add_layernorm_reference(x, r, w),  # type: ignore[arg-type]
            arguments=["x", "residual", "weight"],
            read_only=read_only,
            name="fused_add_layernorm",
        )


@fuzz_settings(ci=12)
@given(
    shape=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    spec=tensor_specs(ANY_DTYPE),
    dim=st.one_of(st.integers(-5, 4), st.sampled_from([None, 1.0, True])),
)
def test_softmax(shape: list[int], spec: TensorSpec, dim: object) -> None:
    x = _t(shape, spec)
    check_call(
        lambda: lt.triton_softmax(x, dim),  # type: ignore[arg-type]
        lambda: lt.softmax_reference(x, dim),  # type: ignore[arg-type]
        arguments=["x", "dim"],
        read_only={"x": x},
        name="softmax",
    )


@fuzz_settings(ci=10)
@given(
    shape=small_shapes,
    spec_g=tensor_specs(FLOATS),
    spec_u=tensor_specs(FLOATS),
    fused=st.booleans(),
    gelu=st.sampled_from([None, "none", "tanh", "exact"]),
)
def test_glu(shape: list[int], spec_g: TensorSpec, spec_u: TensorSpec, fused: bool, gelu: str | None) -> None:
    gate = _t(shape, spec_g)
    up = None if fused else _t(shape, spec_u)

    def halves() -> tuple[torch.Tensor, torch.Tensor]:
        if up is not None:
            return gate, up
        g, u = gate.chunk(2, dim=-1)
        return g, u

    read_only = {"gate": gate} | ({"up": up} if up is not None else {})
    if gelu is None:
        check_call(
            lambda: lt.triton_swiglu(gate, up),
            lambda: lt.swiglu_reference(*halves()),
            arguments=["gate", "up"],
            read_only=read_only,
            name="swiglu",
        )
    else:
        check_call(
            lambda: lt.triton_geglu(gate, up, approximate=gelu),
            lambda: lt.geglu_reference(*halves(), approximate=gelu),
            arguments=["gate", "up", "approximate"],
            read_only=read_only,
            name="geglu",
        )


def _qk(
    layout: str, tokens: tuple[int, int], heads: tuple[int, int], dim: int, spec: TensorSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, k)`` laid out as ``layout`` says (the same values for the same arguments)."""
    b, s = tokens
    hq, hk = heads
    other = TensorSpec(spec.dtype, spec.layout, spec.special, spec.seed + 1)
    if layout == "separate":
        return _t([b, s, hq, dim], spec), _t([b, s, hk, dim], other)
    if layout == "same":
        q = _t([b, s, hq, dim], spec)
        return q, q
    if layout == "fused_qkv":  # slices of one projection: interleaved storage, disjoint elements
        qkv = _t([b, s, (hq + 2 * hk) * dim], spec)
        q = qkv[..., : hq * dim].view(b, s, hq, dim)
        return q, qkv[..., hq * dim : (hq + hk) * dim].view(b, s, hk, dim)
    if layout == "shifted":  # k starts half a head into q's memory: true overlap
        flat = _t([b * s * hq * dim + dim], spec)
        q = flat[: b * s * hq * dim].view(b, s, hq, dim)
        return q, flat[dim // 2 : dim // 2 + b * s * hq * dim].view(b, s, hq, dim)
    if layout == "expanded_q":
        return _t([1, s, hq, dim], spec).expand(b, s, hq, dim), _t([b, s, hk, dim], other)
    raise AssertionError(layout)


@fuzz_settings(ci=12)
@given(
    layout=st.sampled_from(["separate", "same", "fused_qkv", "shifted", "expanded_q"]),
    tokens=st.tuples(st.integers(1, 2), st.integers(1, 4)),
    heads=st.tuples(st.integers(0, 3), st.integers(1, 2)),
    dim=st.sampled_from([2, 4, 6, 8]),
    rotary=st.sampled_from([None, 2, 3]),
    spec=tensor_specs([torch.float32, torch.float16, torch.bfloat16, torch.float64], layouts=["contiguous"]),
    positions=st.sampled_from(["default", "ok", "out_of_range", "wrong_shape", "float"]),
    interleaved=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_rope(
    layout: str,
    tokens: tuple[int, int],
    heads: tuple[int, int],
    dim: int,
    rotary: int | None,
    spec: TensorSpec,
    positions: str,
    interleaved: bool,
    seed: int,
) -> None:
    if layout in ("same", "shifted"):
        heads = (heads[0], heads[0])
    rotary_dim = dim if rotary is None else rotary
    max_pos = 6

    q, k = _qk(layout, tokens, heads, dim, spec)
    q_ref, k_ref = _qk(layout, tokens, heads, dim, spec)  # the same values: the spec fixes the seed
    tables = check_call(
        lambda: lt.rope_cos_sin(max_pos, rotary_dim, device=DEVICE), None, arguments=["rotary_dim"], name="rope_cos_sin"
    )
    assert tables.raised == bool(rotary_dim % 2)
    if tables.raised:
        return
    cos, sin = tables.result
    gen = torch.Generator().manual_seed(seed)
    pos: torch.Tensor | None = {
        "default": None,
        "ok": torch.randint(0, max_pos, tokens, generator=gen),
        "out_of_range": torch.full(tokens, max_pos),
        "wrong_shape": torch.zeros(tokens[1] + 1, dtype=torch.long),
        "float": torch.zeros(tokens),
    }[positions]
    pos = None if pos is None else pos.to(DEVICE)

    def reference() -> tuple[torch.Tensor, torch.Tensor]:
        rotated_q, rotated_k = lt.rope_reference(q_ref, k_ref, cos, sin, pos, interleaved)
        q_ref.copy_(rotated_q)  # the in-place contract: q written first, then k
        k_ref.copy_(rotated_k)
        return q_ref, k_ref

    def call() -> tuple[torch.Tensor, torch.Tensor]:
        lt.triton_rope(q, k, cos, sin, pos, interleaved=interleaved)
        return q, k

    read_only = {"cos": cos, "sin": sin} | ({"positions": pos} if pos is not None else {})
    outcome = check_call(
        call, reference, arguments=["q", "k", "cos", "sin", "positions"], read_only=read_only, name="rope"
    )
    if layout == "expanded_q" and tokens[0] > 1 and heads[0] > 0:
        assert outcome.raised, "an expanded q cannot be rotated in place"


@fuzz_settings(ci=10)
@given(
    n=st.integers(1, 40),
    count=st.integers(0, 80),
    grid=st.integers(1, 3),
    meta=st.sampled_from([{}, {"A": 1}, [1, 2], {"BLOCK_SIZE": 4}]),
)
def test_registry(n: int, count: int, grid: int, meta: object) -> None:
    check_call(
        lambda: lt.KernelConfig("x", meta=meta),  # type: ignore[arg-type]
        None,
        arguments=["meta"],
        name="KernelConfig",
    )
    if not lt.HAS_TRITON or "add" not in lt.list_kernels():
        return
    a = torch.randn(n, device=DEVICE)
    b = torch.randn(n, device=DEVICE)
    out = torch.zeros(n, device=DEVICE)
    kernel = lt.get_kernel("add")

    def launch() -> torch.Tensor:
        kernel.launch(a, b, out, count, grid=(grid,), BLOCK_SIZE=32)
        return out

    def reference() -> torch.Tensor:
        want = torch.zeros(n, device=DEVICE)
        m = min(count, grid * 32)
        want[:m] = a[:m] + b[:m]
        return want

    outcome = check_call(launch, reference, arguments=["n_elements"], read_only={"A": a, "B": b}, name="add launch")
    assert outcome.raised == (count > n)


@fuzz_settings(ci=12)
@given(
    layout=st.sampled_from(["fused_qkv", "separate", "v_is_k"]),
    tokens=st.integers(0, 4),
    heads=st.tuples(st.integers(1, 3), st.integers(1, 2)),
    dim=st.sampled_from([4, 6, 8]),
    rotary=st.sampled_from([None, 2]),
    spec=tensor_specs(FLOATS, layouts=["contiguous", "transposed", "sliced"]),
    store=st.sampled_from(["same", "float32", "int8", "wrong_heads"]),
    slots=st.sampled_from(["distinct", "padding", "out_of_range", "int32"]),
    seed=st.integers(0, 2**16),
)
def test_rope_paged_write(
    layout: str,
    tokens: int,
    heads: tuple[int, int],
    dim: int,
    rotary: int | None,
    spec: TensorSpec,
    store: str,
    slots: str,
    seed: int,
) -> None:
    from llamatelemetry_core.kv_layout import PAD_SLOT, PagedKV

    if slots == "out_of_range" and DEVICE == "cuda":
        return  # unchecked on a GPU (a check would synchronize): the documented contract is the caller's
    kv_heads = heads[1]
    q_heads = heads[0] * kv_heads
    gen = torch.Generator().manual_seed(seed)
    page, blocks, max_pos = 2, 5, 6

    def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if layout == "fused_qkv":
            qkv = _t([tokens, (q_heads + 2 * kv_heads) * dim], spec)
            a, b = q_heads * dim, (q_heads + kv_heads) * dim
            return (
                qkv[:, :a].view(tokens, q_heads, dim),
                qkv[:, a:b].view(tokens, kv_heads, dim),
                qkv[:, b:].view(tokens, kv_heads, dim),
            )
        q, k = _t([tokens, q_heads, dim], spec), _t([tokens, kv_heads, dim], spec)
        return q, k, (k if layout == "v_is_k" else _t([tokens, kv_heads, dim], spec))

    kv_dtype = {"same": spec.dtype, "float32": torch.float32, "int8": torch.int8, "wrong_heads": spec.dtype}[store]
    shape = (blocks, page, kv_heads + (store == "wrong_heads"), dim)
    noise = [torch.randn(shape, generator=gen).to(kv_dtype).to(DEVICE) for _ in range(2)]
    scales = [torch.ones(shape[:3], device=DEVICE) for _ in range(2)] if store == "int8" else [None, None]
    mapping = torch.randperm(blocks * page, generator=gen)[:tokens]
    if slots == "padding":
        mapping[::2] = PAD_SLOT
    elif slots == "out_of_range" and tokens:
        mapping[-1] = blocks * page
    mapping = mapping.to(DEVICE, torch.int32 if slots == "int32" else torch.int64)
    cos, sin = lt.rope_cos_sin(max_pos, rotary or dim, device=DEVICE)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen).to(DEVICE)

    def run(fn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = PagedKV(noise[0].clone(), noise[1].clone(), *scales)
        fn(q, k, v, cos, sin, positions, cache, mapping)
        return q, k, cache.key_cache, cache.value_cache

    q, k, v = inputs()
    q_ref, k_ref, v_ref = inputs()  # the same values: the spec fixes the seed
    read_only = {"cos": cos, "sin": sin, "positions": positions, "slot_mapping": mapping}
    if layout != "v_is_k":
        read_only["v"] = v
    check_call(
        lambda: run(lt.triton_rope_paged_write, q, k, v),
        lambda: run(lt.rope_paged_write_reference, q_ref, k_ref, v_ref),
        arguments=["q", "k", "v", "cos", "sin", "positions", "cache", "store", "slot", "KV storage"],
        read_only=read_only,
        name="rope_paged_write",
    )


def _magnitude(a: torch.Tensor, w: torch.Tensor) -> float:
    """max(|a| @ |w|^T) over finite inputs, in fp64: the size a linear layer's rounding errors scale with."""
    a64 = torch.nan_to_num(a.detach().double().cpu(), nan=0.0, posinf=0.0, neginf=0.0).abs()
    w64 = torch.nan_to_num(w.detach().double().cpu(), nan=0.0, posinf=0.0, neginf=0.0).abs()
    product = a64 @ w64.T
    return float(product.max()) if product.numel() else 0.0


@fuzz_settings(ci=12)
@given(
    rows=st.integers(1, 10),
    k=st.integers(1, 20),
    n=st.integers(1, 6),
    spec_x=tensor_specs(FLOATS),
    spec_w=tensor_specs(FLOATS, special_weight=0.1),
    bias=st.booleans(),
    variant=st.sampled_from(["linear", "rmsnorm", "fused_add_rmsnorm"]),
    swiglu=st.booleans(),
)
def test_linear(
    rows: int,
    k: int,
    n: int,
    spec_x: TensorSpec,
    spec_w: TensorSpec,
    bias: bool,
    variant: str,
    swiglu: bool,
) -> None:
    x = _t([rows, k], spec_x)
    residual = _t([rows, k], TensorSpec(spec_x.dtype, seed=spec_x.seed + 1))
    w = _t([2 * n if swiglu else n, k], spec_w)
    b = _t([w.shape[0]], TensorSpec(spec_w.dtype, seed=spec_w.seed + 1)) if bias else None
    nw = _t([k], TensorSpec(torch.float32, seed=spec_w.seed + 2))
    read_only = {"x": x, "weight": w} | ({"bias": b} if b is not None else {})
    call: Callable[[], object]
    reference: Callable[[], object]
    if variant == "linear":
        normed = x
        call = lambda: lt.triton_linear(x, w, b, swiglu=swiglu)
        reference = lambda: lt.linear_reference(x, w, b, swiglu=swiglu)
    elif variant == "rmsnorm":
        normed = lt.rmsnorm_reference(x, nw)
        call = lambda: lt.triton_rmsnorm_linear(x, nw, w, b, swiglu=swiglu)
        reference = lambda: lt.rmsnorm_linear_reference(x, nw, w, b, swiglu=swiglu)
    else:
        normed = lt.fused_add_rmsnorm_reference(x, residual, nw)[0]
        read_only["residual"] = residual
        call = lambda: lt.triton_fused_add_rmsnorm_linear(x, residual, nw, w, b, swiglu=swiglu)
        reference = lambda: lt.fused_add_rmsnorm_linear_reference(x, residual, nw, w, b, swiglu=swiglu)
    check_call(
        call,
        reference,
        arguments=["x", "weight", "bias", "norm_weight", "residual"],
        read_only=read_only,
        dtype=x.dtype,
        scale=lambda _: 1.0 + _magnitude(normed, w) * (2.0 if swiglu else 1.0),
        name=f"{variant}_linear" + ("_swiglu" if swiglu else ""),
    )
