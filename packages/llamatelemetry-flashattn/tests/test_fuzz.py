"""Fuzzing the attention entry points with hostile inputs (see ``llamatelemetry_core.testing.fuzz``).

Each call draws shapes (no keys, more queries than keys, grouped heads, heads that do not divide), strides,
dtypes, special values and settings (causal, window, softcap, scale, dropout outside training, a config beside
explicit arguments), and must match :func:`attention_reference` or raise a typed error naming an argument,
without writing into q, k or v. NaN and infinities are drawn in q always, and in k and v where every key is
visible: what a masked-out non-finite key or value does is left to each implementation (documented). The
comparison's absolute tolerance scales with the largest finite ``|v|`` (an attention row averages value rows).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from llamatelemetry_core.testing.fuzz import TensorSpec, check_call, fuzz_settings, make_tensor, tensor_specs
from llamatelemetry_flashattn import (
    FlashAttentionConfig,
    attention_reference,
    estimate_inference_memory,
    flash_attention_forward,
    get_optimal_context_length,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32]
# fp16 extremes in q and k make logits of ~4e9: ill-conditioned for any reduced-precision path, so values
# stay within a range where every implementation's answer is defined by its dtype.
SPECIALS = ("none", "nan", "inf", "neg_inf_row", "tiny")


def _largest_finite(t: torch.Tensor) -> float:
    finite = t.detach().double().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs()
    return float(finite.max()) if finite.numel() else 0.0


@fuzz_settings(ci=40)
@given(
    batch=st.integers(1, 2),
    q_len=st.integers(1, 6),
    kv_len=st.integers(0, 7),
    heads=st.sampled_from([(2, 2), (4, 2), (4, 1), (3, 2)]),
    head_dim=st.sampled_from([4, 8, 12]),
    spec_q=tensor_specs(DTYPES, specials=SPECIALS),
    spec_k=tensor_specs(DTYPES, specials=SPECIALS),
    spec_v=tensor_specs(DTYPES, specials=SPECIALS),
    causal=st.sampled_from([True, False, None, 1]),
    window=st.sampled_from([None, (2, 0), (1, 1), (-1, -1), (0, 0), (-2, 0)]),
    softcap=st.sampled_from([None, 0, 4.0, -1.0]),
    scale=st.sampled_from([None, 0.3, 0.0, float("nan")]),
    dropout=st.sampled_from([0.0, 0.5, "x"]),
    with_config=st.booleans(),
)
def test_flash_attention_forward(
    batch: int,
    q_len: int,
    kv_len: int,
    heads: tuple[int, int],
    head_dim: int,
    spec_q: TensorSpec,
    spec_k: TensorSpec,
    spec_v: TensorSpec,
    causal: object,
    window: tuple[int, int] | None,
    softcap: float | None,
    scale: float | None,
    dropout: object,
    with_config: bool,
) -> None:
    num_heads, num_kv = heads
    effective_causal = bool(causal) if causal is not None else with_config
    masked = effective_causal or window not in (None, (-1, -1)) or (window is None and with_config)
    if masked:
        # Non-finite keys or values that a query does not see are implementation-defined (a kernel that skips a
        # masked block never reads them, a masked matmul multiplies them by zero): only visible ones are drawn.
        spec_k = TensorSpec(spec_k.dtype, spec_k.layout, "none", spec_k.seed)
        spec_v = TensorSpec(spec_v.dtype, spec_v.layout, "none", spec_v.seed)
    q = make_tensor([batch, q_len, num_heads, head_dim], spec_q, device=DEVICE)
    k = make_tensor([batch, kv_len, num_kv, head_dim], spec_k, device=DEVICE)
    v = make_tensor([batch, kv_len, num_kv, head_dim], spec_v, device=DEVICE)
    if spec_k.dtype == spec_q.dtype:  # mostly one dtype, so that most draws are valid calls
        k = k.to(q.dtype)
    v = v.to(k.dtype)
    # A config beside explicit arguments: the explicit ones win, the config fills the rest.
    config = FlashAttentionConfig(causal=not causal, window_size=(1, 0), softcap=2.0) if with_config else None

    def call() -> torch.Tensor:
        return flash_attention_forward(
            q,
            k,
            v,
            causal,  # type: ignore[arg-type]
            dropout,  # type: ignore[arg-type]
            scale,
            window,
            softcap=softcap,
            training=False,
            config=config,
        )

    def reference() -> torch.Tensor:
        effective_causal = bool(causal) if causal is not None else (config.causal if config else True)
        effective_window = window if window is not None else (config.window_size if config else None)
        effective_cap = softcap if softcap is not None else (config.softcap if config else None)
        return attention_reference(
            q,
            k,
            v,
            causal=effective_causal,
            softmax_scale=scale,
            window_size=None if effective_window == (-1, -1) else effective_window,
            softcap=effective_cap or None,
        )

    outcome = check_call(
        call,
        reference,
        arguments=["q", "k", "v", "causal", "dropout_p", "softmax_scale", "window_size", "softcap", "head"],
        read_only={"q": q, "k": k, "v": v},
        dtype=q.dtype if q.dtype in (torch.float16, torch.bfloat16) else None,
        scale=lambda _: _largest_finite(v),
        name="flash_attention_forward",
    )
    valid = (
        q.dtype.is_floating_point
        and (DEVICE == "cpu" or q.dtype != torch.float64)  # GPUs take fp16, bf16 and fp32; fp64 is refused
        and k.dtype == q.dtype
        and num_heads % num_kv == 0
        and causal is not None
        and isinstance(causal, bool)
        and dropout != "x"
        and window != (-2, 0)
        and softcap != -1.0
        and scale in (None, 0.3)
    )
    if valid:
        assert not outcome.raised, f"a valid call raised {outcome.error!r}"


@fuzz_settings(ci=40)
@given(
    size=st.one_of(st.floats(1e-3, 500), st.sampled_from([0.0, -1.0, float("inf"), float("nan")])),
    vram=st.one_of(st.floats(1e-3, 200), st.sampled_from([0.0, -2.0, float("nan")])),
    flash=st.sampled_from([True, False, "yes"]),
    quantization=st.sampled_from(["fp16", "q4", "int8", "fp17"]),
)
def test_get_optimal_context_length(size: float, vram: float, flash: object, quantization: str) -> None:
    outcome = check_call(
        lambda: get_optimal_context_length(size, vram, flash, quantization=quantization),  # type: ignore[arg-type]
        None,
        arguments=["model_size_b", "available_vram_gb", "use_flash_attention", "quantization", "fit"],
        name="get_optimal_context_length",
    )
    if outcome.raised:
        if isinstance(outcome.error, MemoryError):  # CapacityError: it really does not fit at the shortest length
            assert not estimate_inference_memory(256, size, vram, bool(flash), quantization=quantization).fits
        return
    n = outcome.result
    assert isinstance(n, int) and n >= 256 and math.log2(n).is_integer()
    assert estimate_inference_memory(n, size, vram, bool(flash), quantization=quantization).fits
