from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from llamatelemetry_core.device import simulate_device
from llamatelemetry_core.errors import BackendUnavailableError, ConfigurationError
from llamatelemetry_core.selection import (
    BACKEND_ENV,
    BackendEnvWarning,
    BackendFallbackWarning,
    CallSpec,
    Operation,
    get_operation,
    last_selection,
    operations,
    record_selections,
    reload_environment,
    requires_dtypes,
    requires_min_capability,
    requires_module,
    reset_fallback_warnings,
    reset_selection_cache,
)

_counter = itertools.count()


def _reference(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def _fast(x: torch.Tensor) -> torch.Tensor:
    return torch.mul(x, 2)


def _new_op(**fast_kwargs: object) -> Operation:
    """A fresh operation 'double' with a fast implementation that runs on CPU float32 by default."""
    op = Operation(f"double_{next(_counter)}", _reference)
    kwargs: dict[str, object] = {"priority": 10, "devices": {"cpu"}, "checks": [requires_dtypes(torch.float32)]}
    kwargs.update(fast_kwargs)
    op.register("fast", _fast, **kwargs)  # type: ignore[arg-type]
    return op


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    reload_environment()
    reset_fallback_warnings()


def test_best_supported_implementation_runs_and_is_observable() -> None:
    op = _new_op()
    x = torch.randn(3, 5)
    half = x.half()
    with record_selections() as rec:
        out = op.dispatch(CallSpec.from_tensors(x), x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the library choosing for the user is not worth a warning
            op.dispatch(CallSpec.from_tensors(half), half)
    assert torch.equal(out, x * 2)
    assert rec.implementations(op.name) == ["fast", "reference"]
    assert rec.last(op.name) == "reference"
    selection = last_selection(op.name)
    assert selection is not None and selection.implementation == "reference"
    assert selection.skipped == (("fast", "supports dtypes {float32}, not float16"),)
    with pytest.raises(KeyError, match="was not dispatched"):
        rec.last("nothing")
    assert get_operation(op.name) is op and op.name in operations()


def test_a_missing_package_warns_once_for_the_process_and_a_choice_never_warns() -> None:
    needs = [requires_module("no_such_package_for_tests", "pip install it"), requires_dtypes(torch.float32)]
    first, second = _new_op(checks=needs), _new_op(checks=needs)
    x = torch.randn(4)
    with pytest.warns(BackendFallbackWarning, match=r"'fast' cannot run here \(no_such_package_for_tests is not"):
        first.dispatch(CallSpec.from_tensors(x), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first.dispatch(CallSpec.from_tensors(x.half()), x.half())  # same package: said once
        second.dispatch(CallSpec.from_tensors(x), x)  # another operation missing the same package: said once
        third = _new_op()
        third.dispatch(CallSpec.from_tensors(x.double()), x.double())  # a dtype it lacks: a choice, silent
    skipped = last_selection(third.name)
    assert skipped is not None and skipped.skipped == (("fast", "supports dtypes {float32}, not float64"),)


def test_not_applicable_device_is_silent() -> None:
    op = _new_op(devices={"cuda"})
    x = torch.randn(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.dispatch(CallSpec.from_tensors(x), x)
    assert op.select(CallSpec.from_tensors(x)).name == "reference"


def test_explicit_request_runs_or_raises() -> None:
    op = _new_op()
    x = torch.randn(4)
    with record_selections() as rec:
        op.dispatch(CallSpec.from_tensors(x), x, backend="reference")
    assert rec.last(op.name) == "reference" and rec.selections[-1].requested
    with pytest.raises(BackendUnavailableError, match=r"requested implementation 'fast' cannot run.*float16"):
        op.dispatch(CallSpec.from_tensors(x.half()), x.half(), backend="fast")
    with pytest.raises(ConfigurationError, match=r"no implementation 'triton'; choose one of \['fast', 'reference'\]"):
        op.dispatch(CallSpec.from_tensors(x), x, backend="triton")


def test_environment_request_global_and_per_operation(monkeypatch: pytest.MonkeyPatch) -> None:
    op = _new_op()
    x = torch.randn(4)
    call = CallSpec.from_tensors(x)
    monkeypatch.setenv(BACKEND_ENV, "reference")
    reload_environment()
    assert op.select(call).name == "reference"
    monkeypatch.setenv(BACKEND_ENV, "sdpa")  # not an implementation of any op: automatic choice, and a warning
    reload_environment()
    with pytest.warns(BackendEnvWarning, match="no registered operation has an implementation named 'sdpa'"):
        assert op.select(call).name == "fast"
    monkeypatch.setenv(BACKEND_ENV, f"other_op=fast, {op.name}=reference")
    reload_environment()
    with pytest.warns(BackendEnvWarning, match="no operation named 'other_op'"):
        assert op.select(call).name == "reference"
    monkeypatch.setenv(BACKEND_ENV, f"{op.name}=fast")
    reload_environment()
    with pytest.raises(BackendUnavailableError):
        op.dispatch(CallSpec.from_tensors(x.half()), x.half())
    monkeypatch.setenv(BACKEND_ENV, f"{op.name}=")
    reload_environment()
    with pytest.raises(ConfigurationError, match="operation=implementation"):
        op.select(call)
    monkeypatch.setenv(BACKEND_ENV, "other_op=fast")  # pairs that do not name this op leave it automatic
    reload_environment()
    with pytest.warns(BackendEnvWarning):
        assert op.select(call).name == "fast"


def test_runtime_unavailability_falls_back_but_bugs_propagate() -> None:
    def cannot_compile(x: torch.Tensor) -> torch.Tensor:
        raise BackendUnavailableError("kernel failed to compile for this GPU")

    def buggy(x: torch.Tensor) -> torch.Tensor:
        raise IndexError("a real bug")

    op = Operation(f"double_{next(_counter)}", _reference)
    op.register("broken", cannot_compile, priority=10, devices={"cpu"})
    x = torch.randn(3)
    with pytest.warns(BackendFallbackWarning, match="failed to compile"):
        out = op.dispatch(CallSpec.from_tensors(x), x)
    assert torch.equal(out, x * 2)
    with pytest.raises(BackendUnavailableError):
        op.dispatch(CallSpec.from_tensors(x), x, backend="broken")
    op.register("buggy", buggy, priority=20, devices={"cpu"})
    with pytest.raises(IndexError, match="a real bug"):
        op.dispatch(CallSpec.from_tensors(x), x)


def test_simulated_t4_skips_ampere_only_paths() -> None:
    op = Operation(f"attention_{next(_counter)}", _reference)
    op.register("flash", _fast, priority=30, devices={"cuda"}, checks=[requires_min_capability(8, 0)])
    op.register("efficient", _fast, priority=20, devices={"cuda"}, checks=[requires_min_capability(5, 0)])
    with simulate_device("t4"):
        call = CallSpec.for_device()
        assert call.dtype == torch.float16
        assert op.select(call).name == "efficient"
        reasons = {c.name: c.reason for c in op.explain(call)}
        assert reasons["flash"] == "needs compute capability >= 8.0, Tesla T4 (simulated) has 7.5"
        assert reasons["efficient"] is None and reasons["reference"] is None
    with simulate_device("h100"):
        assert op.select(CallSpec.for_device()).name == "flash"
    with simulate_device("cpu"):
        assert op.select(CallSpec.for_device()).name == "reference"


def test_registration_rules() -> None:
    op = _new_op()
    with pytest.raises(ConfigurationError, match="already registered"):
        op.register("fast", _fast, priority=1, devices={"cpu"})
    op.register("fast", _fast, priority=1, devices={"cpu"}, replace=True)
    with pytest.raises(ConfigurationError, match="kept for the reference"):
        op.register("reference", _fast, priority=1, devices={"cpu"})
    with pytest.raises(ConfigurationError, match="already registered"):
        Operation(op.name, _reference)
    assert Operation(op.name, _reference, replace=True).name == op.name
    with pytest.raises(KeyError, match="registered"):
        get_operation("no-such-operation")
    with pytest.raises(ConfigurationError, match="at least one tensor"):
        CallSpec.from_tensors()
    assert [i.name for i in op.implementations][-1] == "reference"


def test_module_requirement_and_dynamic_devices() -> None:
    kinds: set[str] = {"cuda"}
    devices: Callable[[], frozenset[str]] = lambda: frozenset(kinds)
    op = Operation(f"double_{next(_counter)}", _reference)
    op.register(
        "plugin",
        _fast,
        priority=5,
        devices=devices,
        checks=[requires_module("no_such_module_for_tests", "pip install it")],
    )
    x = torch.randn(2)
    assert op.select(CallSpec.from_tensors(x)).name == "reference"
    kinds.add("cpu")
    with pytest.warns(BackendFallbackWarning, match=r"no_such_module_for_tests is not installed \(pip install it\)"):
        op.dispatch(CallSpec.from_tensors(x), x)


def test_an_optional_extra_left_out_is_skipped_quietly() -> None:
    op = Operation(f"double_{next(_counter)}", _reference)
    op.register(
        "extra",
        _fast,
        priority=5,
        devices={"cpu"},
        checks=[requires_module("no_such_optional_extra", "pip install it", optional=True)],
    )
    x = torch.randn(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.dispatch(CallSpec.from_tensors(x), x)
    selection = last_selection(op.name)
    assert selection is not None and selection.implementation == "reference"
    assert selection.skipped == (("extra", "no_such_optional_extra is not installed (pip install it)"),)


def test_environment_is_read_once_until_reloaded(monkeypatch: pytest.MonkeyPatch) -> None:
    op = _new_op()
    x = torch.randn(4)
    call = CallSpec.from_tensors(x)
    assert op.select(call).name == "fast"
    monkeypatch.setenv(BACKEND_ENV, "reference")
    assert op.select(call).name == "fast"  # not re-read on every dispatch
    reload_environment()
    assert op.select(call).name == "reference"
    monkeypatch.delenv(BACKEND_ENV)
    reset_selection_cache()
    op.dispatch(call, x)
    assert last_selection(op.name) is not None and last_selection(op.name).implementation == "fast"  # type: ignore[union-attr]


def test_choice_is_remembered_per_call_key_and_forgotten_on_register() -> None:
    asked: list[torch.dtype | None] = []

    def counting(call: CallSpec) -> str | None:
        asked.append(call.dtype)
        return None

    op = _new_op(checks=[counting])
    x = torch.randn(2, 3)
    for _ in range(5):
        op.dispatch(CallSpec.from_tensors(x), x)
    assert asked == [torch.float32]  # chosen once for this key
    y = x.double()
    op.dispatch(CallSpec.from_tensors(y), y)
    op.dispatch(CallSpec.from_tensors(x[:1]), x[:1])  # another shape: another key
    assert asked == [torch.float32, torch.float64, torch.float32]
    op.register("faster", _fast, priority=20, devices={"cpu"})
    with record_selections() as rec:
        op.dispatch(CallSpec.from_tensors(x), x)
    assert rec.last(op.name) == "faster"
    reset_selection_cache()
    op.dispatch(CallSpec.from_tensors(x), x, backend="fast")
    assert asked[-1] == torch.float32 and len(asked) == 4


def test_remembered_fallback_still_warns_after_a_warning_reset() -> None:
    op = _new_op(checks=[requires_module("no_such_package_for_tests", "pip install it")])
    half = torch.randn(3).half()
    with pytest.warns(BackendFallbackWarning):
        op.dispatch(CallSpec.from_tensors(half), half)
    reset_fallback_warnings()
    with pytest.warns(BackendFallbackWarning), record_selections() as rec:
        op.dispatch(CallSpec.from_tensors(half), half)
    assert rec.selections[-1].skipped[0][0] == "fast"


def test_every_reason_is_reported_until_a_gate() -> None:
    def no_odd(call: CallSpec) -> str | None:
        return "takes no odd sizes" if call.shapes and call.shapes[0][-1] % 2 else None

    op = _new_op(checks=[requires_dtypes(torch.float32), no_odd])
    x = torch.randn(3).half()
    reason = {c.name: c.reason for c in op.explain(CallSpec.from_tensors(x))}["fast"]
    assert reason is not None and "not float16" in reason and "takes no odd sizes" in reason
    with pytest.raises(BackendUnavailableError, match=r"float16.*; takes no odd sizes"):
        op.dispatch(CallSpec.from_tensors(x), x, backend="fast")
    gated = _new_op(checks=[requires_module("not_a_module_here", "pip install it"), no_odd])
    reason = {c.name: c.reason for c in gated.explain(CallSpec.from_tensors(x))}["fast"]
    assert reason == "not_a_module_here is not installed (pip install it)"  # the later checks need the module


@dataclass(frozen=True)
class _Facts:
    causal: bool


def test_typed_facts_are_read_and_key_the_choice() -> None:
    def causal_only(call: CallSpec) -> str | None:
        facts = call.facts_as(_Facts)
        return None if facts is None or facts.causal else "supports causal calls only"

    op = _new_op(checks=[causal_only])
    x = torch.randn(3)
    with record_selections() as rec:
        op.dispatch(CallSpec.from_tensors(x, facts=_Facts(causal=True)), x)
        op.dispatch(CallSpec.from_tensors(x, facts=_Facts(causal=False)), x)
        op.dispatch(CallSpec.from_tensors(x), x)
    assert rec.implementations(op.name) == ["fast", "reference", "fast"]
    with pytest.raises(ConfigurationError, match="expected the call's facts to be a _Facts, got int"):
        CallSpec.from_tensors(x, facts=1).facts_as(_Facts)


def test_unhashable_attributes_are_chosen_afresh() -> None:
    op = _new_op()
    x = torch.randn(3)
    with record_selections() as rec:
        op.dispatch(CallSpec.from_tensors(x, extra=[1, 2]), x)
    assert rec.last(op.name) == "fast"


def test_backend_variable_typos_warn_once_listing_valid_names(monkeypatch: pytest.MonkeyPatch) -> None:
    op = _new_op()
    x = torch.randn(4)
    call = CallSpec.from_tensors(x)
    monkeypatch.setenv(BACKEND_ENV, f"{op.name[:-1]}x=fast")
    reload_environment()
    with pytest.warns(BackendEnvWarning, match=rf"no operation named '{op.name[:-1]}x'.*operations: .*{op.name}"):
        assert op.select(call).name == "fast"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.select(call)  # once per value
    monkeypatch.setenv(BACKEND_ENV, f"{op.name}=fsat")
    reload_environment()
    with (
        pytest.warns(BackendEnvWarning, match=r"has no implementation 'fsat' \(one of fast, reference\)"),
        pytest.raises(ConfigurationError, match="no implementation 'fsat'"),
    ):
        op.select(call)
    monkeypatch.setenv(BACKEND_ENV, f"{op.name}=fast")
    reload_environment()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert op.select(call).name == "fast"  # valid names: no warning


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"priority": "high"}, "priority to be an integer"),
        ({"priority": True}, "priority to be an integer"),
        ({"devices": 3}, "devices to be a device kind"),
        ({"devices": ["cpu", ""]}, "devices to be a device kind"),
        ({"checks": [1]}, "every check to be callable"),
        ({"checks": "abc"}, "checks to be a collection"),
    ],
)
def test_register_validates_before_changing_anything(kwargs: dict[str, object], match: str) -> None:
    op = Operation(f"double_{next(_counter)}", _reference)
    arguments: dict[str, object] = {"priority": 1, "devices": ["cpu"], **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        op.register("fast", _fast, **arguments)  # type: ignore[arg-type]
    assert [i.name for i in op.implementations] == ["reference"]
    op.register("fast", _fast, priority=5, devices="cpu")  # a single kind is one kind, not its letters
    x = torch.randn(3)
    assert op.select(CallSpec.from_tensors(x)).name == "fast"
    with pytest.raises(TypeError, match="fn to be callable"):
        op.register("other", "not a function", priority=1, devices="cpu")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="non-empty string"):
        op.register("", _fast, priority=1, devices="cpu")


@dataclass(frozen=True)
class _DecodeFacts:
    kv_len: int

    def selection_class(self) -> tuple[object, ...]:
        return (self.kv_len > 0,)


def test_facts_with_a_selection_class_are_chosen_once_per_class() -> None:
    asked: list[int] = []

    def counting(call: CallSpec) -> str | None:
        facts = call.facts_as(_DecodeFacts)
        asked.append(-1 if facts is None else facts.kv_len)
        return None

    op = _new_op(checks=[counting])
    for kv_len in range(1, 6):
        x = torch.randn(1, kv_len)
        op.dispatch(CallSpec.from_tensors(x, facts=_DecodeFacts(kv_len)), x)
    assert asked == [1]  # longer contexts, same class: no new choice
    x = torch.randn(1, 0)
    op.dispatch(CallSpec.from_tensors(x, facts=_DecodeFacts(0)), x)
    assert asked == [1, 0]


def test_a_former_name_is_an_alias_everywhere_an_operation_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    suffix = next(_counter)
    op = Operation(f"component.double_{suffix}", _reference, aliases=(f"double_alias_{suffix}",))
    op.register("fast", _fast, priority=10, devices={"cpu"})
    alias = f"double_alias_{suffix}"
    assert get_operation(alias) is op
    x = torch.randn(3)
    with record_selections() as rec:
        op.dispatch(CallSpec.from_tensors(x), x)
    assert rec.last(alias) == "fast" and rec.implementations(op.name) == ["fast"]
    last = last_selection(alias)
    assert last is not None and last.operation == op.name
    monkeypatch.setenv(BACKEND_ENV, f"{alias}=reference")
    reload_environment()
    op.dispatch(CallSpec.from_tensors(x), x)
    last = last_selection(op.name)
    assert last is not None and last.implementation == "reference"
    with pytest.raises(ConfigurationError, match="already names another operation"):
        Operation(f"other.double_{suffix}", _reference, aliases=(alias,))
