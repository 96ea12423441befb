"""Hostile inputs that once gave wrong answers or raw errors, each pinned down by name."""

from __future__ import annotations

import pytest
import torch

from llamatelemetry_core.errors import BackendUnavailableError, ConfigurationError
from llamatelemetry_core.selection import record_selections
from llamatelemetry_core.testing import assert_close
from llamatelemetry_flashattn import (
    FlashAttentionConfig,
    attention_backend_report,
    attention_reference,
    flash_attention_forward,
)
from llamatelemetry_flashattn.backends import ATTENTION

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32


def _qkv(q_len: int, kv_len: int, *, heads: int = 2, kv_heads: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, q_len, heads, 16, generator=gen).to(DEVICE, DTYPE)
    k = torch.randn(2, kv_len, kv_heads, 16, generator=gen).to(DEVICE, DTYPE)
    v = torch.randn(2, kv_len, kv_heads, 16, generator=gen).to(DEVICE, DTYPE)
    return q, k, v


def _backends_running(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> list[str]:
    """Every implementation that accepts this call here (each is then run explicitly)."""
    names = []
    for impl in ATTENTION.implementations:
        try:
            flash_attention_forward(q, k, v, backend=impl.name, **kwargs)  # type: ignore[arg-type]
        except BackendUnavailableError:
            continue
        names.append(impl.name)
    return names


@pytest.mark.parametrize(("q_len", "kv_len", "causal"), [(5, 5, True), (5, 5, False), (1, 7, True), (3, 9, True)])
def test_nan_in_a_query_row_gives_a_nan_row_on_every_path(q_len: int, kv_len: int, causal: bool) -> None:
    q, k, v = _qkv(q_len, kv_len)
    q[0, q_len - 1, 1, 3] = float("nan")
    want = attention_reference(q, k, v, causal=causal)
    assert bool(want[0, q_len - 1, 1].isnan().all()) and not bool(want[0, q_len - 1, 0].isnan().any())
    names = _backends_running(q, k, v, causal=causal)
    assert "reference" in names and len(names) >= 2
    for name in names:
        got = flash_attention_forward(q, k, v, causal=causal, backend=name)
        assert_close(got, want, equal_nan=True, name=name, dtype=torch.float16)


def test_nan_in_a_key_poisons_the_rows_that_see_it_on_every_path() -> None:
    q, k, v = _qkv(6, 6)
    k[1, 3, 0, 5] = float("nan")
    want = attention_reference(q, k, v, causal=True)
    for name in _backends_running(q, k, v, causal=True):
        got = flash_attention_forward(q, k, v, causal=True, backend=name)
        assert_close(got, want, equal_nan=True, name=name, dtype=torch.float16)


@pytest.mark.parametrize("causal", [True, False])
def test_no_keys_gives_zeros_on_every_path(causal: bool) -> None:
    q, k, v = _qkv(4, 0)
    assert bool((attention_reference(q, k, v, causal=causal) == 0).all())
    names = _backends_running(q, k, v, causal=causal)
    assert "reference" in names
    for name in names:
        out = flash_attention_forward(q, k, v, causal=causal, backend=name)
        assert out.shape == q.shape and bool((out == 0).all()), name
    assert bool((flash_attention_forward(q, k, v, causal=causal) == 0).all())


def test_explicit_arguments_win_over_the_config() -> None:
    q, k, v = _qkv(6, 6)
    config = FlashAttentionConfig(causal=True, window_size=(2, 0), softcap=3.0)
    got = flash_attention_forward(q, k, v, causal=False, window_size=(-1, -1), softcap=0, config=config)
    assert_close(got, attention_reference(q, k, v, causal=False), dtype=torch.float16)
    from_config = flash_attention_forward(q, k, v, config=config)
    want = attention_reference(q, k, v, causal=True, window_size=(2, 0), softcap=3.0)
    assert_close(from_config, want, dtype=torch.float16)
    with record_selections() as rec:
        flash_attention_forward(q, k, v, backend="reference", config=FlashAttentionConfig(backend="sdpa_cpu"))
    assert rec.last("flash_attention") == "reference"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"config": {}}, TypeError, "expected config to be a FlashAttentionConfig"),
        ({"dropout_p": "x", "training": False}, ConfigurationError, "dropout_p"),
        ({"dropout_p": 1.5, "training": False}, ConfigurationError, "dropout_p"),
        ({"training": "yes"}, ConfigurationError, "training"),
    ],
)
def test_bad_arguments_are_typed_errors(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    q, k, v = _qkv(3, 3)
    with pytest.raises(error, match=match):
        flash_attention_forward(q, k, v, **kwargs)  # type: ignore[arg-type]


def test_backend_report_takes_a_device_name() -> None:
    report = attention_backend_report("cpu")
    assert report[-1].name == "reference" and any(r.selected for r in report)
    with pytest.raises(TypeError, match="expected device to be a DeviceInfo"):
        attention_backend_report(3.5)  # type: ignore[arg-type]
