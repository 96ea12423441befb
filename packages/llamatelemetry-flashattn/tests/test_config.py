"""FlashAttentionConfig: defaults of the guide, validation, and forcing a backend."""

from __future__ import annotations

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.selection import record_selections
from llamatelemetry_flashattn import FlashAttentionConfig, flash_attention_forward


def test_guide_config() -> None:
    config = FlashAttentionConfig(version=2, causal=True, dropout_p=0.0, window_size=None)
    assert (config.version, config.causal, config.dropout_p, config.window_size) == (2, True, 0.0, None)
    assert config.softmax_scale is None and config.softcap is None and config.backend is None


def test_values_are_normalised() -> None:
    config = FlashAttentionConfig(window_size=[128, 0], softcap=0, dropout_p=0)  # type: ignore[arg-type]
    assert config.window_size == (128, 0) and config.softcap is None and config.dropout_p == 0.0
    assert FlashAttentionConfig(window_size=(-1, -1)).window_size is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"version": 3}, "version"),
        ({"causal": 1}, "causal"),
        ({"dropout_p": 1.0}, "dropout_p"),
        ({"dropout_p": -0.1}, "dropout_p"),
        ({"softmax_scale": -1.0}, "softmax_scale"),
        ({"softmax_scale": float("nan")}, "softmax_scale"),
        ({"window_size": (4,)}, "window_size"),
        ({"window_size": (4, -3)}, "window_size"),
        ({"window_size": (4.0, 0)}, "window_size"),
        ({"softcap": float("inf")}, "softcap"),
        ({"backend": "cuda-magic"}, "backend"),
    ],
)
def test_invalid_values_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        FlashAttentionConfig(**kwargs)  # type: ignore[arg-type]


def test_config_drives_a_call_and_forces_its_backend() -> None:
    q = torch.randn(1, 12, 2, 16)
    config = FlashAttentionConfig(causal=False, window_size=(2, 2), backend="reference")
    with record_selections() as record:
        out = flash_attention_forward(q, q, q, config=config)
    assert record.last("flash_attention") == "reference"
    expected = flash_attention_forward(q, q, q, causal=False, window_size=(2, 2), backend="reference")
    torch.testing.assert_close(out, expected)
