"""Bounds of the built-in kernels' launches through the registry: what each tensor must hold for a grid.

``get_kernel("add").launch(a, b, out, n, grid=...)`` hands raw pointers to a kernel that trusts ``n``; a count
larger than the tensors reads and writes past them (a segfault in the interpreter, corrupted memory on a GPU).
The high-level functions never do that; for launches through the registry, each built-in kernel's extents are
written down here and checked before the launch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from llamatelemetry_core.errors import ConfigurationError

__all__ = ["BoundsCheck", "builtin_bounds", "reachable_elements"]

BoundsCheck = Callable[[Mapping[str, Any], tuple[int, ...]], None]
"""Called with the launch's arguments by parameter name and its grid; raises when they overrun a tensor."""


def reachable_elements(t: torch.Tensor) -> int:
    """How many elements of ``t``'s dtype lie in its storage from its first element on."""
    return int(t.untyped_storage().nbytes()) // t.element_size() - int(t.storage_offset())


def _int(args: Mapping[str, Any], name: str, kernel: str) -> int:
    value = args.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"kernel {kernel!r}: expected {name} to be an integer >= 0, got {value!r}")
    return value


def _need(args: Mapping[str, Any], name: str, elements: int, kernel: str, why: str) -> None:
    t = args.get(name)
    if not isinstance(t, torch.Tensor):
        raise ConfigurationError(f"kernel {kernel!r}: expected {name} to be a tensor, got {type(t).__name__}")
    have = reachable_elements(t)
    if elements > have:
        raise ConfigurationError(
            f"kernel {kernel!r}: this launch reaches {elements} elements of {name} ({why}), which holds {have}; "
            "lower the count or the grid, or pass larger tensors"
        )


def _rows(grid: tuple[int, ...]) -> int:
    return grid[0] if grid else 0


def _add(args: Mapping[str, Any], grid: tuple[int, ...]) -> None:
    n = _int(args, "n_elements", "add")
    for name in ("A", "B", "Out"):
        _need(args, name, n, "add", f"n_elements = {n}")


def _rowwise(kernel: str, inputs: tuple[tuple[str, str], ...], outputs: tuple[str, ...]) -> BoundsCheck:
    def check(args: Mapping[str, Any], grid: tuple[int, ...]) -> None:
        rows, n_cols = _rows(grid), _int(args, "n_cols", kernel)
        if rows == 0 or n_cols == 0:
            return
        for name, stride in inputs:
            step = _int(args, stride, kernel)
            _need(args, name, (rows - 1) * step + n_cols, kernel, f"{rows} rows of {n_cols} at stride {step}")
        for name in outputs:
            _need(args, name, rows * n_cols, kernel, f"{rows} rows of {n_cols}")

    return check


def _norm(args: Mapping[str, Any], grid: tuple[int, ...]) -> None:
    rows, n_cols = _rows(grid), _int(args, "n_cols", "norm")
    if rows == 0 or n_cols == 0:
        return
    _rowwise("norm", (("X", "stride_x"),), ("Y",))(args, grid)
    if args.get("HAS_RESIDUAL"):
        _rowwise("norm", (("R", "stride_r"),), ("H",))(args, grid)
    for flag, name in (("HAS_WEIGHT", "W"), ("HAS_BIAS", "B")):
        if args.get(flag):
            _need(args, name, n_cols, "norm", f"n_cols = {n_cols}")
    if args.get("STORE_STATS"):
        for name in ("Mean", "Rstd"):
            _need(args, name, rows, "norm", f"one value per row, {rows} rows")


def _rope(args: Mapping[str, Any], grid: tuple[int, ...]) -> None:
    tokens = _rows(grid)
    half = _int(args, "rotary_half", "rope")
    if tokens == 0 or half == 0:
        return
    _need(args, "Pos", tokens, "rope", f"one position per token, {tokens} tokens")
    for name, heads, stride_t, stride_h in (
        ("Q", "n_q_heads", "q_stride_t", "q_stride_h"),
        ("K", "n_k_heads", "k_stride_t", "k_stride_h"),
    ):
        h = _int(args, heads, "rope")
        if h:
            extent = (tokens - 1) * _int(args, stride_t, "rope") + (h - 1) * _int(args, stride_h, "rope") + 2 * half
            _need(args, name, extent, "rope", f"{tokens} tokens x {h} heads, rotary_half {half}")
    rows = _int(args, "n_positions", "rope")
    for name, stride in (("Cos", "cos_stride"), ("Sin", "sin_stride")):
        if rows:
            _need(args, name, (rows - 1) * _int(args, stride, "rope") + half, "rope", f"{rows} table rows")


def builtin_bounds() -> dict[str, BoundsCheck]:
    """Registry name -> bounds check, for every built-in kernel."""
    norm = _norm
    return {
        "add": _add,
        "layernorm": norm,
        "rmsnorm": norm,
        "fused_add_layernorm": norm,
        "fused_add_rmsnorm": norm,
        "softmax": _rowwise("softmax", (("X", "stride_x"),), ("Y",)),
        "rope": _rope,
        "swiglu": _rowwise("swiglu", (("G", "stride_g"), ("U", "stride_u")), ("Y",)),
        "geglu": _rowwise("geglu", (("G", "stride_g"), ("U", "stride_u")), ("Y",)),
    }
