from __future__ import annotations

import pytest

from llamatelemetry_core.device import real_device_info


def test_markers_skip_by_real_device_and_say_why(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu
        def test_needs_gpu():
            pass

        @pytest.mark.sm90
        def test_needs_hopper():
            pass

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest("-p", "llamatelemetry_core.testing.plugin", "-rs", "--strict-markers")
    result.stdout.fnmatch_lines(["llamatelemetry: device *"])
    device = real_device_info()
    if device.is_cuda:
        result.assert_outcomes(
            passed=3 if device.capability_at_least(9, 0) else 2, skipped=0 if device.capability_at_least(9, 0) else 1
        )
    else:
        result.assert_outcomes(passed=1, skipped=2)
        result.stdout.fnmatch_lines(["*needs a CUDA device (gpu marker)*", "*needs compute capability >= 9.0*"])


def test_simulation_does_not_fool_the_skips(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMATELEMETRY_SIMULATE_DEVICE", "h100")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.gpu
        def test_needs_gpu():
            import torch
            assert torch.cuda.is_available()
        """
    )
    result = pytester.runpytest("-p", "llamatelemetry_core.testing.plugin")
    if real_device_info().is_cuda:
        result.assert_outcomes(passed=1)
    else:
        result.assert_outcomes(skipped=1)
