from __future__ import annotations

import pytest
import torch

from llamatelemetry_core.testing import TOLERANCES, assert_close, tolerance_for


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rounding_to_the_dtype_passes(dtype: torch.dtype) -> None:
    ref = torch.randn(37, 129, dtype=torch.float64)
    assert_close(ref.to(dtype), ref, dtype=dtype)


def test_a_wrong_element_is_reported_with_its_index() -> None:
    ref = torch.randn(5, 7)
    got = ref.clone()
    got[3, 4] += 1.0
    with pytest.raises(AssertionError) as exc:
        assert_close(got, ref, name="softmax")
    text = str(exc.value)
    assert "softmax: 1 of 35 elements differ" in text
    assert "largest error at [3, 4]" in text
    assert "[3, 4]:" in text


def test_nan_and_inf_handling() -> None:
    ref = torch.tensor([1.0, float("nan"), float("inf")])
    with pytest.raises(AssertionError, match="1 of 3"):
        assert_close(ref.clone(), ref)
    assert_close(ref.clone(), ref, equal_nan=True)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0, float("nan"), -float("inf")]), ref, equal_nan=True)
    with pytest.raises(AssertionError, match="2 of 2"):
        assert_close(torch.tensor([float("nan"), 0.0]), torch.tensor([0.0, float("nan")]))


def test_shape_mismatch_and_table() -> None:
    with pytest.raises(AssertionError, match=r"expected shape \[3\], got \[1, 3\]"):
        assert_close(torch.zeros(1, 3), torch.zeros(3))
    assert TOLERANCES[torch.float16].rtol > TOLERANCES[torch.float32].rtol
    assert TOLERANCES[torch.bfloat16].rtol > TOLERANCES[torch.float16].rtol
    assert tolerance_for(torch.int32).atol == 0.0
    assert tolerance_for(torch.float16).scaled(2).atol == 2 * TOLERANCES[torch.float16].atol
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1, 2]), torch.tensor([1, 3]))
