"""get_optimal_context_length: the guide's example, the formula's properties, and its errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_flashattn import estimate_inference_memory, get_optimal_context_length

sizes = st.floats(min_value=0.01, max_value=500, allow_nan=False, allow_infinity=False)
vrams = st.floats(min_value=0.05, max_value=2000, allow_nan=False, allow_infinity=False)
quantizations = st.sampled_from(["fp32", "fp16", "bf16", "int8", "q8", "q4"])
batches = st.integers(min_value=1, max_value=64)


def test_guide_example_lands_near_8192() -> None:
    assert get_optimal_context_length(model_size_b=1.0, available_vram_gb=12.0, use_flash_attention=True) == 8192
    # Standard attention's O(n^2) scores are what run a T4 out of memory first.
    assert get_optimal_context_length(1.0, 12.0, use_flash_attention=False) < 8192


def test_explicit_architecture_and_quantization_are_used() -> None:
    # Llama-3-8B-like, 4-bit weights, on a 24 GiB card.
    gqa = get_optimal_context_length(
        8.0,
        24.0,
        quantization="q4",
        num_layers=32,
        num_kv_heads=8,
        head_dim=128,
        hidden_size=4096,
        num_heads=32,
        vocab_size=128256,
    )
    mha = get_optimal_context_length(
        8.0,
        24.0,
        quantization="q4",
        num_layers=32,
        num_kv_heads=32,
        head_dim=128,
        hidden_size=4096,
        num_heads=32,
        vocab_size=128256,
    )
    assert gqa >= mha
    assert get_optimal_context_length(8.0, 24.0, quantization="q4") >= get_optimal_context_length(8.0, 24.0)


def test_breakdown_adds_up() -> None:
    est = estimate_inference_memory(4096, 1.0, 12.0)
    assert est.total == est.weights + est.kv_cache + est.activations + est.attention
    assert est.fits
    no_flash = estimate_inference_memory(4096, 1.0, 12.0, use_flash_attention=False)
    assert no_flash.attention > 1000 * est.attention  # O(n^2) vs O(n) at n = 4096


def _longest_or_zero(size: float, vram: float, flash: bool = True, **kwargs: object) -> int:
    """get_optimal_context_length, or 0 for a model that does not fit at all (its CapacityError)."""
    try:
        return get_optimal_context_length(size, vram, flash, **kwargs)  # type: ignore[arg-type]
    except CapacityError:
        return 0


@settings(max_examples=60, deadline=None)
@given(size=sizes, vram=vrams, more=st.floats(min_value=0, max_value=500), q=quantizations, batch=batches)
def test_more_vram_never_shortens(size: float, vram: float, more: float, q: str, batch: int) -> None:
    assert _longest_or_zero(size, vram + more, quantization=q, batch_size=batch) >= _longest_or_zero(
        size, vram, quantization=q, batch_size=batch
    )


@settings(max_examples=60, deadline=None)
@given(size=sizes, bigger=st.floats(min_value=0, max_value=500), vram=vrams, flash=st.booleans())
def test_bigger_model_never_lengthens(size: float, bigger: float, vram: float, flash: bool) -> None:
    assert _longest_or_zero(size + bigger, vram, flash) <= _longest_or_zero(size, vram, flash)


@settings(max_examples=60, deadline=None)
@given(
    size=sizes,
    vram=vrams,
    q=quantizations,
    batch=batches,
    low=st.integers(min_value=1, max_value=4096),
    span=st.integers(min_value=1, max_value=1 << 20),
)
def test_power_of_two_in_range_and_flash_never_shorter(
    size: float, vram: float, q: str, batch: int, low: int, span: int
) -> None:
    high = max(low * 2, low + span)

    def longest(flash: bool) -> int:
        """The answer, or 0 when even the shortest context does not fit (a CapacityError)."""
        try:
            n = get_optimal_context_length(
                size, vram, flash, quantization=q, batch_size=batch, min_context=low, max_context=high
            )
        except CapacityError:
            shortest = 1 << (low - 1).bit_length()
            assert not estimate_inference_memory(shortest, size, vram, flash, quantization=q, batch_size=batch).fits
            return 0
        assert n & (n - 1) == 0 and low <= n <= high
        return n

    assert longest(False) <= longest(True)


@pytest.mark.parametrize("bad", [0, -1, 0.0, -3.5, float("nan"), float("inf"), True, "8"])
def test_bad_sizes_raise_value_error(bad: object) -> None:
    with pytest.raises(ValueError, match="model_size_b"):
        get_optimal_context_length(bad, 12.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="available_vram_gb"):
        get_optimal_context_length(1.0, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantization": "q3"}, "quantization"),
        ({"kv_dtype": "fp4"}, "kv_dtype"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_layers": -2}, "num_layers"),
        ({"min_context": 4096, "max_context": 1024}, "min_context"),
        ({"min_context": 600, "max_context": 1000}, "power of two"),
    ],
)
def test_bad_options_raise_value_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        get_optimal_context_length(1.0, 12.0, **kwargs)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(size=st.floats(min_value=1e-9, max_value=1e6), vram=st.floats(min_value=1e-9, max_value=1e6))
def test_no_arithmetic_errors_on_extreme_valid_inputs(size: float, vram: float) -> None:
    n = _longest_or_zero(size, vram)
    assert n == 0 or (n >= 256 and math.log2(n).is_integer())


def test_a_model_that_does_not_fit_is_a_capacity_error_with_the_numbers() -> None:
    fits_not = r"70B-parameter model \(fp16\) does not fit 12 GiB.*needs 1[0-9]{2}\.\d+ GiB"
    with pytest.raises(CapacityError, match=fits_not):
        get_optimal_context_length(70.0, 12.0)
    with pytest.raises(ConfigurationError, match="use_flash_attention"):
        get_optimal_context_length(1.0, 12.0, "yes")  # type: ignore[arg-type]
