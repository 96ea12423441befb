"""GraphCaptureConfig: defaults, and every invalid value rejected at construction with expected/got."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_graphs import GraphCaptureConfig


def test_defaults() -> None:
    config = GraphCaptureConfig()
    assert config.warmup_iters == 3
    assert config.pool is None
    assert config.capture_error_mode == "global"
    assert config.stream is None


@pytest.mark.parametrize("mode", ["global", "thread_local", "relaxed"])
def test_every_capture_error_mode_of_pytorch_is_accepted(mode: str) -> None:
    assert GraphCaptureConfig(capture_error_mode=mode).capture_error_mode == mode  # type: ignore[arg-type]


def test_zero_warmup_and_a_pool_handle_are_accepted() -> None:
    config = GraphCaptureConfig(warmup_iters=0, pool=(0, 7))
    assert (config.warmup_iters, config.pool) == (0, (0, 7))


@pytest.mark.parametrize("value", [-1, 1.5, True, "3", None])
def test_invalid_warmup_iters(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"expected GraphCaptureConfig\.warmup_iters .*got"):
        GraphCaptureConfig(warmup_iters=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["Global", "strict", "", None])
def test_invalid_capture_error_mode_lists_the_choices(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"'global', 'thread_local', 'relaxed', got"):
        GraphCaptureConfig(capture_error_mode=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [(0, 0), (1,), (1, 2, 3), [0, 1], (1, -2), (True, 1), "pool", 5])
def test_invalid_pool_says_where_to_get_a_handle(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"graph_pool_handle\(\)") as info:
        GraphCaptureConfig(pool=value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [object(), "cuda", 0])
def test_invalid_stream(value: object) -> None:
    with pytest.raises(ConfigurationError, match=r"expected GraphCaptureConfig\.stream to be a torch\.cuda\.Stream"):
        GraphCaptureConfig(stream=value)  # type: ignore[arg-type]


def test_config_is_frozen() -> None:
    config = GraphCaptureConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.warmup_iters = 5  # type: ignore[misc]


def test_configuration_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="warmup_iters"):
        GraphCaptureConfig(warmup_iters=-3)
    assert isinstance(torch.__version__, str)
