from __future__ import annotations

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError, LlamaTelemetryError
from llamatelemetry_core.validation import (
    check_dtype,
    check_in,
    check_ndim,
    check_non_negative_int,
    check_positive_int,
    check_probability,
    check_same_device,
    check_shape,
    check_tensor,
    format_shape,
)


def test_errors_are_also_builtin_exceptions() -> None:
    with pytest.raises(ValueError, match="expected x"):
        check_positive_int(0, "x")
    assert issubclass(ConfigurationError, LlamaTelemetryError)


def test_shape_message_names_expected_and_got() -> None:
    q = torch.empty(2, 16, 5, 64)
    check_shape(q, [2, None, 5, 64], "q")
    with pytest.raises(ConfigurationError) as exc:
        check_shape(q, [2, None, 32, 64], "q", layout="[B, S, H, D]")
    assert str(exc.value) == "expected q of shape [B, S, H, D] [2, *, 32, 64], got [2, 16, 5, 64]"
    with pytest.raises(ConfigurationError, match=r"got \[2, 16, 5, 64\]"):
        check_shape(q, [2, 16, 5], "q")
    assert format_shape([None, 3]) == "[*, 3]"


def test_dtype_message_says_how_to_fix() -> None:
    x = torch.empty(3, dtype=torch.float64)
    check_dtype(x, {torch.float64}, "x")
    with pytest.raises(ConfigurationError, match=r"dtype in \{bfloat16, float16\}, got float64; convert it"):
        check_dtype(x, [torch.float16, torch.bfloat16], "x")


def test_ndim_and_device_and_scalars() -> None:
    with pytest.raises(ConfigurationError, match="expected x with 2 or 3 dimensions"):
        check_ndim(torch.empty(4), (2, 3), "x")
    check_ndim(torch.empty(4, 4), 2, "x")
    assert check_same_device({"a": torch.empty(1), "b": torch.empty(2)}) == torch.device("cpu")
    with pytest.raises(ConfigurationError, match="a on cpu, b on meta"):
        check_same_device({"a": torch.empty(1), "b": torch.empty(1, device="meta")})
    for bad in (True, -1, 1.5, "2"):
        with pytest.raises(ConfigurationError):
            check_non_negative_int(bad, "n")
    assert check_non_negative_int(0, "n") == 0
    assert check_probability(0.25, "p") == 0.25
    with pytest.raises(ConfigurationError, match=r"in \[0, 1\)"):
        check_probability(1.0, "p")
    with pytest.raises(ConfigurationError, match="one of 'a', 'b', got 'c'"):
        check_in("c", ("a", "b"), "mode")
    with pytest.raises(TypeError, match=r"expected x to be a torch\.Tensor, got list"):
        check_tensor([1], "x")
