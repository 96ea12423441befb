"""Shared machinery of the fuzz suites: hypothesis budgets, hostile-tensor strategies, and one verdict.

Every package's ``tests/test_fuzz.py`` draws calls of its public operations from these strategies (shapes,
strides, dtypes, aliasing, special values) and hands each call to :func:`check_call`, which accepts exactly two
outcomes:

* the call returns, its result equals the reference within the shared tolerance table (NaN where the reference
  has NaN, the same infinities), and no input the contract calls read-only was written;
* the call raises a typed error (:class:`~llamatelemetry_core.errors.LlamaTelemetryError`, ``TypeError`` or
  ``ValueError``) whose message names one of the call's arguments.

Anything else (another exception type, a silent mismatch, a mutated read-only input) fails the test.

Budgets: each test states its CI budget (``fuzz_settings(ci=10)``); ``LLAMATELEMETRY_FUZZ_PROFILE`` scales it
(``ci``, the default: as stated; ``thorough``: 25 times more; ``smoke``: one example). This module needs
hypothesis (a test dependency) and is not imported by :mod:`llamatelemetry_core.testing` itself.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from llamatelemetry_core.errors import ConfigurationError, LlamaTelemetryError
from llamatelemetry_core.selection import BackendFallbackWarning
from llamatelemetry_core.testing.compare import assert_close, tolerance_for

__all__ = [
    "FUZZ_PROFILE_ENV",
    "LAYOUTS",
    "PROFILES",
    "SPECIALS",
    "Outcome",
    "TensorSpec",
    "check_call",
    "fuzz_profile",
    "fuzz_settings",
    "make_tensor",
    "register_fuzz_profiles",
    "tensor_specs",
]

FUZZ_PROFILE_ENV = "LLAMATELEMETRY_FUZZ_PROFILE"
PROFILES: dict[str, float] = {"smoke": 0.0, "ci": 1.0, "thorough": 25.0}
"""Profile name -> factor applied to each test's CI budget (``smoke`` runs one example)."""

LAYOUTS = ("contiguous", "transposed", "expanded", "sliced", "channels_last")
"""How a tensor's memory is laid out: see :func:`make_tensor`."""

SPECIALS = ("none", "nan", "inf", "neg_inf_row", "fp16_extremes", "tiny")
"""Which special values a tensor holds besides random normal ones: see :func:`make_tensor`."""

TYPED_ERRORS: tuple[type[BaseException], ...] = (LlamaTelemetryError, TypeError, ValueError)


def fuzz_profile() -> str:
    """The profile named by ``LLAMATELEMETRY_FUZZ_PROFILE`` (default ``ci``); raises for an unknown name."""
    name = os.environ.get(FUZZ_PROFILE_ENV, "").strip().lower() or "ci"
    if name not in PROFILES:
        raise ConfigurationError(f"expected {FUZZ_PROFILE_ENV} to be one of {sorted(PROFILES)}, got {name!r}")
    return name


def fuzz_settings(ci: int) -> settings:
    """hypothesis settings for a fuzz test whose CI budget is ``ci`` examples, scaled by the profile.

    No deadline (the Triton interpreter is slow and uneven), no example database (runs stay independent of
    earlier ones), examples derandomised and not shrunk in CI so a red run is quick and reproducible from its log.
    """
    profile = fuzz_profile()
    examples = max(1, round(ci * PROFILES[profile]))
    # Shrinking re-runs a failing case hundreds of times, minutes in the interpreter: only the thorough profile
    # shrinks; CI reports the failing example as drawn (derandomised, so the log reproduces it).
    phases = list(Phase) if profile == "thorough" else [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(
        phases=phases,
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=profile != "thorough",
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


def register_fuzz_profiles() -> None:
    """Register ``llamatelemetry-<profile>`` hypothesis profiles and load the selected one as the default.

    Tests with explicit settings keep theirs (use :func:`fuzz_settings` for a scaled budget); the loaded profile
    governs the rest. The pytest plugin calls this at start-up.
    """
    for name, factor in PROFILES.items():
        settings.register_profile(
            f"llamatelemetry-{name}",
            max_examples=max(1, round(100 * factor)),
            deadline=None,
            database=None,
        )
    settings.load_profile(f"llamatelemetry-{fuzz_profile()}")


# --- tensors ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """How to build one input: its dtype, memory layout, special values and seed (see :func:`make_tensor`)."""

    dtype: torch.dtype
    layout: str = "contiguous"
    special: str = "none"
    seed: int = 0


def tensor_specs(
    dtypes: Sequence[torch.dtype],
    *,
    layouts: Sequence[str] = LAYOUTS,
    specials: Sequence[str] = SPECIALS,
    special_weight: float = 0.3,
) -> st.SearchStrategy[TensorSpec]:
    """Draw a :class:`TensorSpec`; special values come in about ``special_weight`` of the draws."""
    plain = st.just("none")
    unusual = st.sampled_from([s for s in specials if s != "none"]) if len(specials) > 1 else plain
    special = st.one_of(plain, unusual) if special_weight < 0.5 else st.one_of(unusual, plain)
    return st.builds(
        TensorSpec,
        dtype=st.sampled_from(list(dtypes)),
        layout=st.sampled_from(list(layouts)),
        special=special,
        seed=st.integers(0, 2**31 - 1),
    )


def _fill_special(t: torch.Tensor, special: str, generator: torch.Generator) -> None:
    """Write ``special`` values into a contiguous float tensor ``t`` in place, at random positions."""
    n = t.numel()
    if n == 0 or special == "none":
        return
    flat = t.view(-1)
    picks = torch.randint(0, n, (max(1, n // 8),), generator=generator)
    if special == "nan":
        flat[picks[:1]] = float("nan")
    elif special == "inf":
        flat[picks[:1]] = float("inf")
        flat[picks[1:2]] = float("-inf")
    elif special == "neg_inf_row":
        rows = t.view(-1, t.shape[-1]) if t.dim() else t.view(1, 1)
        row = int(torch.randint(0, rows.shape[0], (1,), generator=generator))
        rows[row] = float("-inf")
    elif special == "fp16_extremes":
        values = torch.tensor([65504.0, -65504.0, 6e-8, -6e-8, 6.1e-5, 0.0], dtype=torch.float64)
        chosen = values[torch.randint(0, len(values), (len(picks),), generator=generator)]
        flat[picks] = chosen.to(t.dtype)
    elif special == "tiny":
        t.mul_(1e-6 if t.dtype in (torch.float16, torch.bfloat16) else 1e-30)
    else:
        raise ConfigurationError(f"expected special to be one of {SPECIALS}, got {special!r}")


def make_tensor(
    shape: Sequence[int],
    spec: TensorSpec,
    *,
    device: torch.device | str = "cpu",
    scale: float = 1.0,
) -> torch.Tensor:
    """A random tensor of ``shape`` built as ``spec`` says.

    Layouts: ``contiguous``; ``transposed`` (the last two dimensions swapped in memory); ``expanded`` (the
    first dimension of size > 1 has stride 0: every slice along it is the same memory); ``sliced`` (every
    other element along the last dimension of a wider buffer); ``channels_last`` (4-d tensors stored NHWC).
    A layout that does not apply to the shape (``transposed`` of a vector) gives a contiguous tensor. Values are
    ``scale * N(0, 1)`` plus ``spec.special``; integer dtypes get small random integers.
    """
    shape = [int(s) for s in shape]
    generator = torch.Generator().manual_seed(spec.seed)
    layout = spec.layout
    expand_dim = next((i for i, s in enumerate(shape) if s > 1), None)
    # The values every visible element holds (an expanded tensor's are those of its first slice), specials included.
    value_shape = list(shape)
    if layout == "expanded" and expand_dim is not None:
        value_shape[expand_dim] = 1
    if spec.dtype.is_floating_point:
        values = (torch.randn(value_shape, generator=generator, dtype=torch.float64) * scale).to(spec.dtype)
        _fill_special(values, spec.special, generator)
    else:
        values = torch.randint(-8, 8, value_shape, generator=generator).to(spec.dtype)
    values = values.to(device)  # before the layout: moving a strided view would make it contiguous
    if layout == "transposed" and len(shape) >= 2:
        out = values.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "expanded" and expand_dim is not None:
        out = values.expand(shape)
    elif layout == "sliced" and shape:
        wide = torch.zeros([*shape[:-1], 2 * shape[-1]], dtype=spec.dtype, device=values.device)
        wide[..., ::2] = values
        wide[..., 1::2] = 7  # never read: a value a kernel reading the wrong stride would show
        out = wide[..., ::2]
    elif layout == "channels_last" and len(shape) == 4:
        out = values.contiguous(memory_format=torch.channels_last)
    else:
        out = values
    return out


# --- the verdict ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What :func:`check_call` saw: the result (when the call returned) or the typed error it raised."""

    result: Any = None
    error: BaseException | None = None

    @property
    def raised(self) -> bool:
        return self.error is not None


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for item in value for t in _tensor_leaves(item)]
    return []


def _snapshot(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in tensors.items()}


def check_call(
    call: Callable[[], Any],
    reference: Callable[[], Any] | None,
    *,
    arguments: Sequence[str],
    read_only: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    scale: Callable[[torch.Tensor], float] | None = None,
    name: str = "result",
    documented: tuple[type[BaseException], ...] = (),
) -> Outcome:
    """Run ``call`` and judge it against ``reference`` (see the module docstring); return what happened.

    ``arguments`` are the names the call's typed errors may mention (at least one must appear in the message);
    ``read_only`` maps names to inputs that must hold the same values afterwards. ``dtype`` picks the tolerance
    (default: each result's dtype); ``scale(expected)`` widens the absolute tolerance to
    ``tolerance.atol * scale`` for results whose size is set by the inputs' magnitude (matmul, attention).
    ``reference`` runs only when ``call`` returned; it must not raise. ``reference=None`` checks only the kind of
    outcome (for calls whose result is not a tensor computation, such as validators). ``documented`` adds
    exception types the call's contract names besides the typed ones (``KeyError`` for an unknown key of a
    mapping-like API); they too must name an argument.
    """
    before = _snapshot(read_only or {})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BackendFallbackWarning)  # falling back is a legitimate outcome
            result = call()
    except (*TYPED_ERRORS, *documented) as exc:
        message = str(exc)
        if not any(arg in message for arg in arguments):
            raise AssertionError(
                f"{name}: a typed error must name the argument at fault (one of {list(arguments)}), got "
                f"{type(exc).__name__}: {message}"
            ) from exc
        _check_unchanged(before, read_only or {}, name)
        return Outcome(error=exc)
    except Exception as exc:  # anything else is a bug by definition
        raise AssertionError(
            f"{name}: expected a result or a typed error (LlamaTelemetryError, TypeError, ValueError), got "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    _check_unchanged(before, read_only or {}, name)
    if reference is None:
        return Outcome(result=result)
    expected = reference()
    got_leaves, want_leaves = _tensor_leaves(result), _tensor_leaves(expected)
    if len(got_leaves) != len(want_leaves):
        raise AssertionError(f"{name}: got {len(got_leaves)} tensors, the reference returned {len(want_leaves)}")
    for i, (got, want) in enumerate(zip(got_leaves, want_leaves, strict=True)):
        label = name if len(got_leaves) == 1 else f"{name}[{i}]"
        if got.dtype != want.dtype:
            raise AssertionError(f"{label}: dtype {got.dtype}, the reference gives {want.dtype}")
        atol = None
        if scale is not None:
            atol = tolerance_for(dtype or got.dtype).atol * max(1.0, scale(want))
        assert_close(got, want, dtype=dtype, atol=atol, equal_nan=True, name=label)
    return Outcome(result=result)


def _check_unchanged(before: Mapping[str, torch.Tensor], now: Mapping[str, torch.Tensor], name: str) -> None:
    for arg, old in before.items():
        new = now[arg].detach()
        if old.is_floating_point():
            equal = bool((old.isnan() == new.isnan()).all()) and bool(((old == new) | old.isnan()).all())
        else:
            equal = torch.equal(old, new)
        if not equal:
            raise AssertionError(f"{name}: the call wrote into {arg}, which its contract says is read-only")
