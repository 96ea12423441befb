"""Capture errors: PyTorch's and CUDA's messages are mapped to the rule they break, with the fix."""

from __future__ import annotations

import pytest

from llamatelemetry_core.errors import LlamaTelemetryError
from llamatelemetry_graphs import CAPTURE_RULES, GraphCaptureError
from llamatelemetry_graphs.errors import capture_error, explain_capture_error, rule_by_name

# Messages as PyTorch raises them (CUDA runtime error strings wrapped by AT_CUDA_CHECK / TORCH_CHECK).
MESSAGES = {
    "host-sync": "CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors might be ...",
    "legacy-stream": "CUDA error: operation would make the legacy stream depend on a capturing blocking stream",
    "unjoined-stream": "CUDA error: capturing stream has unjoined work",
    "foreign-stream": "CUDA error: dependency created on uncaptured work in another stream",
    "captured-event": "CUDA error: operation not permitted on an event last recorded in a capturing stream",
    "wrong-thread": "CUDA error: attempt to terminate a thread-local capture sequence from another thread",
    "default-stream": "CUDA graphs must be captured on a non-default stream. (However, after capture, ...)",
    "invalidated": "CUDA error: operation failed due to a previous error during capture",
    "forbidden-call": "Cannot call CUDAGeneratorImpl::current_seed during CUDA graph capture. If you need ...",
}


@pytest.mark.parametrize(("rule", "message"), sorted(MESSAGES.items()))
def test_known_messages_are_explained(rule: str, message: str) -> None:
    explained = explain_capture_error(RuntimeError(message))
    assert explained is not None
    assert explained.rule == rule
    text = str(explained)
    assert text.startswith(f"CUDA graph capture failed [{rule}]: ")
    assert "What to do: " in text
    assert "PyTorch said: " + message.splitlines()[0] in text


def test_the_host_sync_explanation_names_the_usual_culprits_and_the_fix() -> None:
    explained = explain_capture_error(RuntimeError(MESSAGES["host-sync"]))
    assert explained is not None
    for culprit in (".item()", ".cpu()", "nonzero()", "torch.cuda.synchronize()"):
        assert culprit in str(explained)
    assert "torch.where" in str(explained) and "capture_error_mode='thread_local'" in str(explained)


def test_ordinary_errors_are_not_explained_away() -> None:
    assert explain_capture_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)")) is None
    assert explain_capture_error(ValueError("bad value")) is None


def test_an_explained_error_is_returned_as_is() -> None:
    error = capture_error("cpu-tensor", "output tensor 0 is on cpu")
    assert explain_capture_error(error) is error
    assert "(output tensor 0 is on cpu)" in str(error)


def test_error_classes() -> None:
    error = capture_error("nested-capture")
    assert isinstance(error, GraphCaptureError)
    assert isinstance(error, LlamaTelemetryError)
    assert isinstance(error, RuntimeError)


def test_rules_are_unique_and_complete() -> None:
    names = [rule.name for rule in CAPTURE_RULES]
    assert len(names) == len(set(names))
    assert set(MESSAGES) | {"cpu-tensor", "nested-capture", "dynamic-output"} == set(names)
    for rule in CAPTURE_RULES:
        assert rule.explanation and rule.fix
        assert all(marker == marker.lower() for marker in rule.markers)
    with pytest.raises(KeyError, match=r"no capture rule 'nope'; known rules: host-sync"):
        rule_by_name("nope")
