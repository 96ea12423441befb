"""A process-wide, thread-safe registry of Triton kernels, with launch configurations.

The built-in kernels register themselves under ``add``, ``layernorm``, ``softmax``, ``rmsnorm``,
``fused_add_rmsnorm``, ``fused_add_layernorm``, ``rope``, ``swiglu`` and ``geglu`` when Triton imports; any
code may register its own::

    config = KernelConfig(name="relu", block_size=256, num_warps=4)
    register_kernel("relu", relu_kernel, config)
    get_kernel("relu").launch(x, out, n, grid=(triton.cdiv(n, 256),))  # BLOCK_SIZE=256 is passed for you

:meth:`RegisteredKernel.launch` passes the config's ``block_size`` as the ``BLOCK_SIZE`` meta-parameter (and any
``meta`` entries) only to kernels that declare them, and ``num_warps`` / ``num_stages`` as launch options; an
explicit keyword from the caller always wins.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from llamatelemetry_core.environment import TRITON_INTERPRET_ENV, triton_interpreter_enabled
from llamatelemetry_core.errors import CapabilityError, ConfigurationError
from llamatelemetry_core.interpreter import triton_launch_guard
from llamatelemetry_core.toolchain import TRITON_INSTALL
from llamatelemetry_triton._bounds import BoundsCheck
from llamatelemetry_triton._compat import HAS_TRITON, TRITON_IMPORT_ERROR, triton

__all__ = ["KernelConfig", "RegisteredKernel", "get_kernel", "list_kernels", "register_kernel", "unregister_kernel"]

_MAX_WARPS = 32  # 32 warps x 32 threads = 1024 threads, the most a block may have
Grid = tuple[int, ...] | Callable[[dict[str, Any]], tuple[int, ...]]


@dataclass(frozen=True)
class KernelConfig:
    """Launch configuration of a registered kernel.

    ``block_size`` is passed as the kernel's ``BLOCK_SIZE`` meta-parameter when it has one; ``num_warps`` (a power
    of two, 1 to 32) and ``num_stages`` (>= 1) are Triton launch options; ``meta`` holds further constexpr
    values passed to kernels that declare them. Raises :class:`ConfigurationError` on invalid values.
    """

    name: str
    block_size: int = 128
    num_warps: int = 4
    num_stages: int = 2
    meta: Mapping[str, int | float | bool | str] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        name: object = self.name  # validated at run time whatever the annotation says
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"expected KernelConfig.name to be a non-empty string, got {self.name!r}")
        for attr in ("block_size", "num_warps", "num_stages"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"expected KernelConfig.{attr} to be a positive integer, got {value!r}")
        if self.block_size & (self.block_size - 1):
            raise ConfigurationError(
                f"expected KernelConfig.block_size to be a power of two (tl.arange needs one), got {self.block_size}"
            )
        if self.num_warps & (self.num_warps - 1) or self.num_warps > _MAX_WARPS:
            raise ConfigurationError(
                f"expected KernelConfig.num_warps to be a power of two from 1 to {_MAX_WARPS}, got {self.num_warps}"
            )
        meta: object = self.meta
        if not isinstance(meta, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int | float | bool | str) for k, v in meta.items()
        ):
            raise ConfigurationError(
                "expected KernelConfig.meta to be a mapping of constexpr names to int, float, bool or str values, "
                f"got {self.meta!r}"
            )
        reserved = {"BLOCK_SIZE", "num_warps", "num_stages"} & set(self.meta)
        if reserved:
            raise ConfigurationError(
                f"KernelConfig.meta must not set {sorted(reserved)}; "
                "use the block_size, num_warps and num_stages fields"
            )
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))


BuiltinEntry = tuple[Any, KernelConfig, BoundsCheck]
"""A built-in kernel as its operation's module lists it (``registry_entries``): kernel, default launch config,
bounds check."""


def _parameter_names(kernel: Any) -> tuple[str, ...]:
    names = getattr(kernel, "arg_names", None)
    if names is None:
        import inspect

        inner = kernel
        while hasattr(inner, "fn"):
            inner = inner.fn
        names = list(inspect.signature(inner).parameters)
    return tuple(names)


def _autotuned_keys(kernel: Any) -> frozenset[str] | None:
    """Meta-parameters an autotuner or heuristics wrapper sets itself (``None`` for a plain kernel)."""
    configs = getattr(kernel, "configs", None)
    values = getattr(kernel, "values", None)
    if configs is None and values is None:
        return None
    keys: set[str] = {"num_warps", "num_stages"} if configs is not None else set()
    for config in configs or ():
        keys.update(getattr(config, "kwargs", {}))
    keys.update(values or {})
    return frozenset(keys)


def _is_interpreted(kernel: Any) -> bool:
    inner = kernel
    while True:
        if type(inner).__name__ == "InterpretedFunction":
            return True
        if not hasattr(inner, "fn"):
            return False
        inner = inner.fn


class RegisteredKernel:
    """A Triton kernel with its :class:`KernelConfig`; launch it with :meth:`launch`."""

    def __init__(self, name: str, kernel: Any, config: KernelConfig, bounds: BoundsCheck | None = None) -> None:
        self.name = name
        self.kernel = kernel
        self.config = config
        self.bounds = bounds
        self.parameters = _parameter_names(kernel)
        self.interpreted = _is_interpreted(kernel)

    def __repr__(self) -> str:
        return f"RegisteredKernel({self.name!r}, parameters={list(self.parameters)}, config={self.config})"

    def _check_devices(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.device | None:
        named = [(self.parameters[i] if i < len(self.parameters) else f"#{i}", a) for i, a in enumerate(args)]
        named += list(kwargs.items())
        tensors = [(n, t) for n, t in named if isinstance(t, torch.Tensor)]
        cuda = {t.device for _, t in tensors if t.device.type == "cuda"}
        others = [(n, t.device) for n, t in tensors if t.device.type not in ("cuda", "cpu")]
        if others:
            n, dev = others[0]
            raise ConfigurationError(f"kernel {self.name!r}: expected CUDA tensors, got {n} on {dev}")
        if len(cuda) > 1:
            listing = ", ".join(f"{n} on {t.device}" for n, t in tensors)
            raise ConfigurationError(
                f"kernel {self.name!r}: expected every tensor on one CUDA device, got {listing}; "
                "move them with .to(device) first"
            )
        if not self.interpreted:
            cpu = [n for n, t in tensors if t.device.type == "cpu"]
            if cpu:
                hint = (
                    f"{TRITON_INTERPRET_ENV}=1 was set after this kernel was defined; set it before Triton kernels "
                    "are defined (before importing them)"
                    if triton_interpreter_enabled()
                    else f"or set {TRITON_INTERPRET_ENV}=1 before importing Triton to run it on CPU in the interpreter"
                )
                raise ConfigurationError(
                    f"kernel {self.name!r}: expected CUDA tensors, got {', '.join(cpu)} on cpu; move them with "
                    f".cuda(), {hint}"
                )
        return next(iter(cuda), None)

    def launch(self, *args: Any, grid: Grid, **meta: Any) -> Any:
        """Launch the kernel on ``grid`` (a tuple of up to three ints, or a callable of the meta-parameters).

        Positional and keyword arguments go to the kernel as they would with ``kernel[grid](...)``. The
        config's ``BLOCK_SIZE`` and ``meta`` values are added only for parameters the kernel declares and the
        caller did not give; ``num_warps`` / ``num_stages`` are added unless given. Raises
        :class:`ConfigurationError` for a malformed grid or tensors on the wrong device.
        """
        if not callable(grid):
            dims: object = grid  # validated at run time whatever the annotation says
            if (
                not isinstance(dims, tuple | list)
                or not 1 <= len(dims) <= 3
                or any(isinstance(g, bool) or not isinstance(g, int) or g < 0 for g in dims)
            ):
                raise ConfigurationError(
                    f"kernel {self.name!r}: expected grid to be a tuple of 1 to 3 integers >= 0 or a callable "
                    f"of the meta-parameters, got {grid!r}"
                )
            grid = tuple(grid)
            if 0 in grid:
                return None  # nothing to do; Triton would reject an empty grid on some versions
        device = self._check_devices(args, meta)
        given = set(self.parameters[: len(args)]) | set(meta)
        tuned = _autotuned_keys(self.kernel) or frozenset()
        extra: dict[str, Any] = {}
        defaults: dict[str, Any] = {"BLOCK_SIZE": self.config.block_size, **self.config.meta}
        for key, value in defaults.items():
            if key in self.parameters and key not in given and key not in tuned:
                extra[key] = value
        for key in ("num_warps", "num_stages"):
            if key not in given and key not in tuned:
                extra[key] = getattr(self.config, key)
        call = {**extra, **meta}
        if self.bounds is not None:
            named = {**dict(zip(self.parameters, args, strict=False)), **call}
            self.bounds(named, tuple(grid(named)) if callable(grid) else grid)
        if device is not None:
            with torch.cuda.device(device):
                return self.kernel[grid](*args, **call)
        with triton_launch_guard(torch.device("cpu")):  # the interpreter runs one launch at a time
            return self.kernel[grid](*args, **call)


_lock = threading.Lock()
_kernels: dict[str, RegisteredKernel] = {}


def _require_triton(what: str) -> None:
    if not HAS_TRITON:
        raise CapabilityError(f"{what} needs Triton, which is not installed ({TRITON_IMPORT_ERROR}): {TRITON_INSTALL}")


def register_kernel(
    name: str,
    kernel: Any,
    config: KernelConfig | None = None,
    *,
    replace: bool = False,
    bounds: BoundsCheck | None = None,
) -> RegisteredKernel:
    """Register a ``@triton.jit`` kernel (or an autotuned one) under ``name`` and return its registry entry.

    ``config`` defaults to ``KernelConfig(name)``; its name must match ``name``. A taken name raises
    :class:`ConfigurationError` unless ``replace=True``. Raises :class:`CapabilityError` without Triton.
    ``bounds``, when given, is called before every launch with the arguments by parameter name and the grid,
    and raises :class:`ConfigurationError` when they would take the kernel past a tensor's end (the built-in
    kernels have one each).
    """
    _require_triton(f"register_kernel({name!r})")
    given: object = name  # validated at run time whatever the annotation says
    if not isinstance(given, str) or not given.strip():
        raise ConfigurationError(f"expected name to be a non-empty string, got {name!r}")
    if not isinstance(kernel, triton.runtime.KernelInterface):
        raise ConfigurationError(
            f"expected kernel to be a Triton kernel (decorated with @triton.jit), got {type(kernel).__name__}"
        )
    if bounds is not None and not callable(bounds):
        raise ConfigurationError(f"expected bounds to be None or a callable, got {type(bounds).__name__}")
    if config is None:
        config = KernelConfig(name)
    elif not isinstance(config, KernelConfig):
        raise ConfigurationError(f"expected config to be a KernelConfig or None, got {type(config).__name__}")
    elif config.name != name:
        raise ConfigurationError(
            f"expected the config's name to match the registered name {name!r}, got {config.name!r}; "
            "use KernelConfig(name=...) with the same name"
        )
    entry = RegisteredKernel(name, kernel, config, bounds)
    with _lock:
        if name in _kernels and not replace:
            raise ConfigurationError(
                f"a kernel named {name!r} is already registered; pass replace=True to replace it, or pick another name"
            )
        _kernels[name] = entry
    return entry


def _check_name(name: object) -> None:
    if not isinstance(name, str):
        raise TypeError(f"expected name to be a kernel name (a str), got {type(name).__name__}; see list_kernels()")


def unregister_kernel(name: str) -> RegisteredKernel:
    """Remove ``name`` from the registry and return its entry; ``KeyError`` listing the known names otherwise."""
    _check_name(name)
    with _lock:
        if name not in _kernels:
            raise KeyError(f"no kernel named {name!r} is registered; registered: {sorted(_kernels)}")
        return _kernels.pop(name)


def get_kernel(name: str) -> RegisteredKernel:
    """The kernel registered under ``name``; ``KeyError`` listing the registered names otherwise.

    Raises ``TypeError`` when ``name`` is not a string.
    """
    _check_name(name)
    with _lock:
        entry = _kernels.get(name)
        if entry is None:
            known = sorted(_kernels)
            hint = "" if HAS_TRITON else f" (Triton is not installed: {TRITON_IMPORT_ERROR}; nothing is registered)"
            raise KeyError(f"no kernel named {name!r} is registered; registered: {known}{hint}")
        return entry


def list_kernels(*, runnable_only: bool = True) -> list[str]:
    """Names of the registered kernels, sorted.

    With ``runnable_only`` (the default) the list holds the kernels that can run in this process: empty when
    Triton is missing, or when there is neither a CUDA device nor the Triton interpreter. Pass
    ``runnable_only=False`` for every registered name.
    """
    with _lock:
        names = sorted(_kernels)
    if not runnable_only:
        return names
    if not HAS_TRITON:
        return []
    if torch.cuda.is_available():
        return names
    with _lock:
        return [n for n in names if _kernels[n].interpreted]
