"""What every operation of this package shares: its Triton implementation's checks, call descriptions, and
the path taken while ``torch.compile`` traces a call."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.environment import triton_devices
from llamatelemetry_core.errors import BackendUnavailableError, ConfigurationError
from llamatelemetry_core.selection import CallSpec, Check, Operation, QuietReason, requires_dtypes, requires_module
from llamatelemetry_core.toolchain import TRITON_INSTALL
from llamatelemetry_core.traced import traced_name, traced_request
from llamatelemetry_core.validation import dtype_name, format_shape
from llamatelemetry_triton._compat import HAS_TRITON, triton

__all__ = [
    "TRITON",
    "TRITON_DTYPES",
    "TRITON_PRIORITY",
    "TritonCall",
    "TritonOperation",
    "call_spec",
    "check_float_tensor",
    "check_vector",
    "compute_dtype",
    "cuda_in_triton_dtypes",
    "described",
    "device_info",
    "needs_autograd",
    "register_triton",
    "run_op",
    "triton_errors",
]

TRITON = "triton"
TRITON_PRIORITY = 100
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def device_info(device: torch.device) -> DeviceInfo:
    """:func:`get_device_info` from core's cache: no device query (no ``cudaMemGetInfo``) on a kernel's hot path."""
    return get_device_info(device, refresh_memory=False)


@dataclass(frozen=True)
class TritonCall:
    """The facts of a call to one of this package's operations: a case the Triton kernel does not cover."""

    unsupported: str | None = None


_SUPPORTED = TritonCall()


Described = tuple[tuple[torch.Tensor, ...], TritonCall]
"""A call by its tensors and facts: what :func:`dispatch` takes (see :func:`described`)."""


def described(first: torch.Tensor, *others: torch.Tensor | None, triton_unsupported: str | None = None) -> Described:
    """Describe a call by its tensors (``None`` for absent optional ones); ``triton_unsupported`` is the reason
    the Triton kernel cannot take this call, if any."""
    tensors = (first, *(t for t in others if t is not None))
    return tensors, _SUPPORTED if triton_unsupported is None else TritonCall(triton_unsupported)


def call_spec(first: torch.Tensor, *others: torch.Tensor | None, triton_unsupported: str | None = None) -> CallSpec:
    """The :class:`CallSpec` of :func:`described` (what ``select`` and ``explain`` take)."""
    tensors, facts = described(first, *others, triton_unsupported=triton_unsupported)
    return CallSpec.from_tensors(*tensors, facts=facts)


def _bf16_supported(call: CallSpec) -> str | None:
    if call.dtype == torch.bfloat16 and call.device.is_cuda and not call.device.supports_bf16:
        return f"bfloat16 needs compute capability >= 8.0, {call.device.name} has {call.device.compute_capability}"
    return None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The precision a reference computes ``x`` in: float64 for float64 inputs (never downgraded), else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _interpreted_bf16(call: CallSpec) -> str | None:
    # The interpreter computes with NumPy, which has no bfloat16: it rounds float32 -> bfloat16 toward zero, one
    # ulp off in a quarter to a half of the elements. The reference gives the correctly rounded result.
    if call.dtype == torch.bfloat16 and not call.device.is_cuda:
        return QuietReason(
            "the Triton interpreter truncates float32 -> bfloat16 (NumPy has no bfloat16); bfloat16 runs the "
            "reference on CPU"
        )
    return None


def _attr_reason(call: CallSpec) -> str | None:
    facts = call.facts_as(TritonCall)
    return None if facts is None else facts.unsupported


def register_triton(op: Operation, fn: Callable[..., Any], extra_checks: Sequence[Check] = ()) -> None:
    """Register ``fn`` as ``op``'s ``triton`` implementation, with the checks every Triton kernel here needs.

    A call may carry a :class:`TritonCall` with the reason the kernel does not cover it.
    """
    checks: list[Check] = [
        requires_module("triton", TRITON_INSTALL),
        requires_dtypes(*TRITON_DTYPES),
        _bf16_supported,
        _interpreted_bf16,
        _attr_reason,
        *extra_checks,
    ]
    op.register(TRITON, fn, priority=TRITON_PRIORITY, devices=triton_devices, checks=checks)


class TritonOperation(Operation):
    """An operation of this package: its reference, its Triton implementation (registered with the checks of
    :func:`register_triton`), and how a call is described; calling it runs the call.

    ``describe(*args)`` gives the call's :data:`Described` (its tensors, and a reason the kernel cannot take it);
    ``traceable(*args)`` says whether the Triton path is worth putting in a ``torch.compile`` graph when chosen
    (a CUDA tensor of a supported dtype; an interpreted kernel on a CPU tensor is not, unless requested).
    """

    def __init__(
        self,
        name: str,
        reference: Callable[..., Any],
        triton_fn: Callable[..., Any],
        *,
        describe: Callable[..., Described],
        traceable: Callable[..., bool],
        aliases: Sequence[str] = (),
        extra_checks: Sequence[Check] = (),
    ) -> None:
        super().__init__(name, reference, aliases=aliases)
        register_triton(self, triton_fn, extra_checks)
        self._reference_fn = reference
        self._triton_fn = triton_fn
        self._describe = describe
        self._traceable = traceable

    def __call__(self, *args: Any, backend: str | None = None) -> Any:
        """Run the operation on ``args``: through :meth:`Operation.run` eagerly; directly while ``torch.compile``
        traces. Dynamo cannot trace the selection machinery (locks, context variables), and need not: under
        tracing the choice is made as eagerly, once per trace, and is a constant of the graph
        (:func:`llamatelemetry_core.traced.traced_name`: ``backend`` and ``LLAMATELEMETRY_BACKEND`` honoured, an
        impossible request raises)."""
        tensors, facts = self._describe(*args)
        if torch.compiler.is_compiling():
            name = traced_name(self, tensors, (TritonCall, (("unsupported", facts.unsupported),)), backend)
            if name == TRITON and (self._traceable(*args) or traced_request(self.name, backend) == TRITON):
                return self._triton_fn(*args)
            return self._reference_fn(*args)
        return self.run(tensors, *args, facts=facts, backend=backend)


def cuda_in_triton_dtypes(first: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether a call is worth tracing into a Triton kernel when chosen: its first tensor is on a CUDA device and
    every tensor named has a dtype the kernels take (see :class:`TritonOperation`'s ``traceable``)."""
    return first.is_cuda and first.dtype in TRITON_DTYPES and all(t.dtype in TRITON_DTYPES for t in others)


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether a call must record a backward: grad mode is on and some input requires grad.

    Without one, the launchers run directly, skipping ``autograd.Function`` (microseconds that matter for
    small kernels).
    """
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run_op(op: Callable[..., Any], launcher: Callable[..., Any], *args: Any) -> Any:
    """Call the custom op ``op`` while ``torch.compile`` traces, the ``launcher`` behind it otherwise.

    Eagerly the custom op adds nothing but dispatcher overhead (tens of microseconds per call, more than a small
    kernel takes), so eager calls launch directly; compiled graphs and their CUDA graphs contain the custom op.
    While a Python dispatch mode is active (one that records what a call writes, say), the custom op runs, so
    the mode sees the operation and the arguments it mutates.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return op(*args)
    return launcher(*args)


def triton_errors(operation: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn Triton's resource and compilation failures into :class:`BackendUnavailableError`.

    Dispatch then falls back to the reference with one warning (or raises if Triton was requested explicitly);
    any other exception propagates untouched.
    """
    errors: tuple[type[BaseException], ...] = ()
    if HAS_TRITON:
        from triton.compiler.errors import CompilationError

        errors = (triton.runtime.errors.OutOfResources, CompilationError)

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except errors as exc:
                raise BackendUnavailableError(
                    f"{operation}: the Triton kernel could not be compiled or launched here: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    operation=operation,
                    backend=TRITON,
                ) from exc

        return wrapper

    return decorate


def check_float_tensor(x: object, name: str) -> torch.Tensor:
    """Return ``x`` if it is a floating-point tensor; raise ``TypeError`` / :class:`ConfigurationError` otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ConfigurationError(
            f"expected {name} to be a floating-point tensor, got {dtype_name(x.dtype)}; convert it with "
            f"{name}.float() or {name}.half()"
        )
    return x


def check_vector(v: torch.Tensor | None, n: int, name: str, x: torch.Tensor) -> None:
    """Raise unless ``v`` is ``None`` or a float vector of ``n`` elements on ``x``'s device."""
    if v is None:
        return
    check_float_tensor(v, name)
    if tuple(v.shape) != (n,):
        raise ConfigurationError(
            f"expected {name} of shape [{n}] (the last dimension of x, shape {format_shape(x.shape)}), "
            f"got {format_shape(v.shape)}"
        )
    if v.device != x.device:
        raise ConfigurationError(f"expected {name} on {x.device} like x, got {v.device}; move it with .to(x.device)")
