"""Fuzzing core's public calls: validation helpers, the selection policy, and the fuzz machinery itself.

Each test draws arguments, hostile ones included, and accepts a result or a typed error naming the argument,
nothing else (:func:`llamatelemetry_core.testing.fuzz.check_call`). Budgets scale with
``LLAMATELEMETRY_FUZZ_PROFILE``.
"""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.interpreter import INTERPRETER_LOCK, triton_launch_guard
from llamatelemetry_core.selection import CallSpec, Operation
from llamatelemetry_core.testing.fuzz import (
    FUZZ_PROFILE_ENV,
    LAYOUTS,
    SPECIALS,
    TensorSpec,
    check_call,
    fuzz_settings,
    make_tensor,
    tensor_specs,
)
from llamatelemetry_core.validation import (
    check_in,
    check_non_negative_int,
    check_positive_int,
    check_probability,
    check_shape,
    check_tensor,
)

_counter = itertools.count()
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(), max_size=3),
    st.builds(torch.zeros, st.integers(0, 3)),
)


@fuzz_settings(ci=60)
@given(value=anything)
def test_validation_helpers_return_or_raise_typed_errors(value: object) -> None:
    expectations = {
        "check_positive_int": lambda: check_positive_int(value, "blocks"),
        "check_non_negative_int": lambda: check_non_negative_int(value, "blocks"),
        "check_probability": lambda: check_probability(value, "blocks"),
        "check_in": lambda: check_in(value, ("a", 1), "blocks"),
        "check_tensor": lambda: check_tensor(value, "blocks"),
    }
    for name, call in expectations.items():
        outcome = check_call(call, None, arguments=["blocks"], name=name)
        if not outcome.raised:
            if name == "check_positive_int":
                assert isinstance(value, int) and not isinstance(value, bool) and value > 0
            if name == "check_probability":
                assert isinstance(value, int | float) and 0 <= float(value) < 1 and math.isfinite(float(value))


@fuzz_settings(ci=30)
@given(
    shape=st.lists(st.integers(0, 4), max_size=4),
    expected=st.lists(st.one_of(st.none(), st.integers(0, 4)), max_size=4),
)
def test_check_shape_accepts_exactly_the_matching_shapes(shape: list[int], expected: list[int | None]) -> None:
    t = torch.zeros(shape)
    matches = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape, strict=False))
    outcome = check_call(lambda: check_shape(t, expected, "keys"), None, arguments=["keys"])
    assert outcome.raised != matches


@fuzz_settings(ci=40)
@given(
    name=st.one_of(st.text(max_size=3), st.none(), st.integers()),
    priority=st.one_of(st.integers(-5, 5), st.text(max_size=2), st.booleans(), st.floats(0, 1)),
    devices=st.one_of(
        st.sampled_from(["cpu", "cuda"]),
        st.lists(st.sampled_from(["cpu", "cuda", ""]), max_size=2),
        st.integers(),
        st.none(),
    ),
)
def test_register_either_succeeds_or_leaves_the_operation_unchanged(
    name: object, priority: object, devices: object
) -> None:
    op = Operation(f"fuzz_op_{next(_counter)}", lambda x: x + 1)
    before = [i.name for i in op.implementations]
    outcome = check_call(
        lambda: op.register(name, lambda x: x + 2, priority=priority, devices=devices),  # type: ignore[arg-type]
        None,
        arguments=["name", "priority", "devices", "reference"],
        name="register",
    )
    names = [i.name for i in op.implementations]
    if outcome.raised:
        assert names == before
    else:
        assert name in names
        kinds = op.implementation(str(name)).device_kinds()
        assert isinstance(devices, str | list)
        assert kinds == ({devices} if isinstance(devices, str) else set(devices))
    # Whatever happened, the operation still takes a valid registration and dispatches.
    op.register("valid", lambda x: x + 3, priority=100, devices="cpu", replace=True)
    x = torch.zeros(2)
    assert torch.equal(op.dispatch(CallSpec.from_tensors(x), x), x + 3)


@fuzz_settings(ci=40)
@given(
    shape=st.lists(st.integers(1, 4), min_size=0, max_size=4),
    spec=tensor_specs([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32]),
)
def test_make_tensor_builds_the_layout_it_names(shape: list[int], spec: TensorSpec) -> None:
    t = make_tensor(shape, spec)
    assert list(t.shape) == shape and t.dtype == spec.dtype
    expandable = any(s > 1 for s in shape)
    if spec.layout == "expanded" and expandable:
        assert 0 in t.stride()
    if spec.layout == "sliced" and shape and shape[-1] > 1:
        assert t.stride(-1) == 2
    if spec.layout == "transposed" and len(shape) >= 2 and shape[-1] > 1 and shape[-2] > 1:
        assert not t.is_contiguous()
    if spec.layout == "channels_last" and len(shape) == 4 and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert t.is_contiguous(memory_format=torch.channels_last)
    if spec.special == "nan" and spec.dtype.is_floating_point:
        assert bool(t.isnan().any())
    if spec.special == "neg_inf_row" and spec.dtype.is_floating_point:
        assert bool(t.isneginf().any())


def test_the_strategies_cover_every_layout_and_special() -> None:
    assert set(LAYOUTS) >= {"contiguous", "transposed", "expanded", "sliced", "channels_last"}
    assert set(SPECIALS) >= {"none", "nan", "inf", "neg_inf_row", "fp16_extremes", "tiny"}


def test_check_call_fails_silent_mismatches_untyped_errors_and_writes() -> None:
    x = torch.randn(4)
    check_call(lambda: x * 2, lambda: x * 2, arguments=["x"])
    with pytest.raises(AssertionError, match="elements differ"):
        check_call(lambda: x * 2, lambda: x * 3, arguments=["x"])
    with pytest.raises(AssertionError, match="expected a result or a typed error"):
        check_call(lambda: [][1], None, arguments=["x"])
    with pytest.raises(AssertionError, match="must name the argument"):
        check_call(lambda: (_ for _ in ()).throw(ValueError("bad")), None, arguments=["x"])
    with pytest.raises(AssertionError, match="wrote into x"):
        check_call(lambda: x.add_(1), lambda: x, arguments=["x"], read_only={"x": x})
    nan = torch.tensor([float("nan"), 1.0])
    check_call(lambda: nan.clone(), lambda: nan.clone(), arguments=["x"], read_only={"x": nan})
    with pytest.raises(AssertionError):
        check_call(lambda: torch.zeros(2), lambda: nan.clone(), arguments=["x"])  # NaN lost: a silent mismatch


def test_fuzz_profile_scales_budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FUZZ_PROFILE_ENV, "thorough")
    assert fuzz_settings(ci=4).max_examples == 100
    monkeypatch.setenv(FUZZ_PROFILE_ENV, "smoke")
    assert fuzz_settings(ci=40).max_examples == 1
    monkeypatch.setenv(FUZZ_PROFILE_ENV, "thorogh")
    with pytest.raises(ConfigurationError, match=FUZZ_PROFILE_ENV):
        fuzz_settings(ci=4)


def test_interpreter_launches_are_serialised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_launch_guard(torch.device("cpu")) is INTERPRETER_LOCK
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_launch_guard(torch.device("cpu")) is not INTERPRETER_LOCK
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inside = 0
    most = 0
    guard = threading.Lock()

    def launch() -> None:
        nonlocal inside, most
        for _ in range(50):
            with triton_launch_guard(torch.device("cpu")):
                with guard:
                    inside += 1
                    most = max(most, inside)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=launch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most == 1
