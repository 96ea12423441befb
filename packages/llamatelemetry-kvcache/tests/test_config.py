"""KVCacheConfig: validation, the bytes report, the memory check, the fp8 policy, quantization accuracy."""

from __future__ import annotations

import pytest
import torch

from llamatelemetry_core.device import simulate_device
from llamatelemetry_core.errors import CapabilityError, CapacityError, ConfigurationError
from llamatelemetry_kvcache import KVCache, KVCacheConfig, dequantize_kv, quantize_kv

FP8 = getattr(torch, "float8_e4m3fn", None)


def test_defaults_resolve_kv_heads_device_and_storage() -> None:
    config = KVCacheConfig(2, 16, 3, 8, 4, torch.float32, device="cpu")
    assert (config.num_kv_heads, config.kv_dtype, config.device) == (8, torch.float32, torch.device("cpu"))
    assert not config.quantized
    assert config.bytes_per_token() == 2 * 8 * 4 * 4
    assert config.nbytes() == 3 * 2 * 16 * config.bytes_per_token()
    assert "3 layers x 2 sequences x 16 tokens" in config.memory_report()


def test_the_guide_config_reports_its_size_before_allocating() -> None:
    config = KVCacheConfig(
        max_batch_size=8, max_seq_length=4096, num_layers=32, num_heads=32, head_dim=128, dtype=torch.float16
    )
    assert config.nbytes() == 32 * 8 * 4096 * 2 * 32 * 128 * 2  # 16 GiB
    assert "16.00 GiB" in config.memory_report()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_seq_length": -1}, "max_seq_length"),
        ({"num_layers": True}, "num_layers"),
        ({"head_dim": 2.0}, "head_dim"),
        ({"num_kv_heads": 3}, "divide num_heads"),
        ({"dtype": torch.int8}, "dtype"),
        ({"kv_dtype": torch.float32}, "kv_dtype"),
        ({"device": "meta"}, "cuda or cpu"),
    ],
)
def test_bad_values_are_refused_with_the_value(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "max_batch_size": 2,
        "max_seq_length": 8,
        "num_layers": 2,
        "num_heads": 4,
        "head_dim": 8,
        "dtype": torch.float16,
        "device": "cpu",
    }
    args.update(kwargs)
    with pytest.raises(ConfigurationError, match=match):
        KVCacheConfig(**args)  # type: ignore[arg-type]


def test_int8_halves_the_bytes_of_float16_plus_scales() -> None:
    fp16 = KVCacheConfig(4, 64, 2, 8, 128, torch.float16, device="cpu")
    int8 = KVCacheConfig(4, 64, 2, 8, 128, torch.float16, device="cpu", kv_dtype=torch.int8)
    assert int8.quantized
    assert int8.nbytes() == fp16.nbytes() // 2 + 2 * 2 * 4 * 64 * 8 * 4  # + one float32 scale per token and head
    assert KVCache(int8).nbytes() == int8.nbytes()


def test_a_cache_larger_than_memory_is_refused_with_the_numbers() -> None:
    config = KVCacheConfig(1024, 1 << 20, 64, 64, 256, torch.float32, device="cpu")
    with pytest.raises(CapacityError, match=r"needs .* GiB but .* has .* memory"):
        KVCache(config)


@pytest.mark.skipif(FP8 is None, reason="this torch has no float8_e4m3fn")
def test_fp8_is_refused_on_a_t4_and_allowed_on_an_h100() -> None:
    assert FP8 is not None
    with simulate_device("t4"), pytest.raises(CapabilityError, match=r"fp8.*7\.5.*kv_dtype=torch.int8"):
        KVCacheConfig(2, 8, 1, 4, 8, torch.float16, kv_dtype=FP8)
    with simulate_device("h100"):
        assert KVCacheConfig(2, 8, 1, 4, 8, torch.float16, kv_dtype=FP8).quantized
    with simulate_device("t4"):  # int8 works everywhere
        assert KVCacheConfig(2, 8, 1, 4, 8, torch.float16, kv_dtype=torch.int8).quantized


@pytest.mark.parametrize("kv_dtype", [torch.int8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantization_error_is_within_half_a_step(kv_dtype: torch.dtype | None, dtype: torch.dtype) -> None:
    if kv_dtype is None:
        pytest.skip("this torch has no float8_e4m3fn")
    x = (torch.randn(3, 5, 2, 24) * torch.rand(3, 5, 2, 1) * 10).to(dtype)
    x[0, 0, 0] = 0  # an all-zero head vector must not divide by zero
    q, scale = quantize_kv(x, kv_dtype)
    assert q.dtype == kv_dtype and scale.shape == (3, 5, 2) and scale.dtype == torch.float32
    back = dequantize_kv(q, scale, torch.float32)
    amax = x.float().abs().amax(-1, keepdim=True)
    # int8: half a step (amax / 254); e4m3: 3 mantissa bits, a relative error of at most 2^-4 of the value.
    bound = amax / 254 if kv_dtype == torch.int8 else x.float().abs() / 16 + amax / 448 * 2**-9
    slack = torch.finfo(dtype).eps * x.float().abs() + 1e-6
    assert ((back - x.float()).abs() <= bound + slack).all()
    assert torch.equal(back[0, 0, 0], torch.zeros(24))


@pytest.mark.parametrize(("kv_dtype", "bound"), [(torch.int8, 0.02), (FP8, 0.08)], ids=["int8", "fp8"])
def test_attention_error_of_quantized_kv_against_fp16_kv(kv_dtype: torch.dtype | None, bound: float) -> None:
    """The accuracy cost of quantized storage, where it shows: attention output over dequantized K/V.

    Over 30 seeds the largest error was 7e-3 (int8) and 3e-2 (fp8) for outputs of magnitude ~0.4.
    """
    if kv_dtype is None:
        pytest.skip("this torch has no float8_e4m3fn")
    q = torch.randn(2, 8, 3, 64)
    k = torch.randn(2, 2, 300, 64).half()
    v = torch.randn(2, 2, 300, 64).half()
    want = torch.nn.functional.scaled_dot_product_attention(q, k.float(), v.float(), enable_gqa=True)
    kd = dequantize_kv(*quantize_kv(k, kv_dtype), torch.float32)
    vd = dequantize_kv(*quantize_kv(v, kv_dtype), torch.float32)
    got = torch.nn.functional.scaled_dot_product_attention(q, kd, vd, enable_gqa=True)
    err = (got - want).abs().max().item()
    print(f"{kv_dtype}: max attention output error {err:.2e} (outputs up to {want.abs().max().item():.2e})")
    assert err < bound
