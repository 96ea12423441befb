"""Bounds of the built-in kernels' launches through the registry: what each tensor must hold for a grid.

``get_kernel("add").launch(a, b, out, n, grid=...)`` hands raw pointers to a kernel that trusts ``n``; a count
larger than the tensors reads and writes past them (a segfault in the interpreter, corrupted memory on a GPU).
The high-level functions never do that; for launches through the registry, each built-in kernel's extents are
written down beside the kernel, in its operation's module (``registry_entries``), with the helpers here, and
checked before the launch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from llamatelemetry_core.errors import ConfigurationError

__all__ = ["BoundsCheck", "grid_rows", "int_argument", "reachable_elements", "require_elements", "rowwise"]

BoundsCheck = Callable[[Mapping[str, Any], tuple[int, ...]], None]
"""Called with the launch's arguments by parameter name and its grid; raises when they overrun a tensor."""


def reachable_elements(t: torch.Tensor) -> int:
    """How many elements of ``t``'s dtype lie in its storage from its first element on."""
    return int(t.untyped_storage().nbytes()) // t.element_size() - int(t.storage_offset())


def int_argument(args: Mapping[str, Any], name: str, kernel: str) -> int:
    value = args.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"kernel {kernel!r}: expected {name} to be an integer >= 0, got {value!r}")
    return value


def require_elements(args: Mapping[str, Any], name: str, elements: int, kernel: str, why: str) -> None:
    t = args.get(name)
    if not isinstance(t, torch.Tensor):
        raise ConfigurationError(f"kernel {kernel!r}: expected {name} to be a tensor, got {type(t).__name__}")
    have = reachable_elements(t)
    if elements > have:
        raise ConfigurationError(
            f"kernel {kernel!r}: this launch reaches {elements} elements of {name} ({why}), which holds {have}; "
            "lower the count or the grid, or pass larger tensors"
        )


def grid_rows(grid: tuple[int, ...]) -> int:
    return grid[0] if grid else 0


def rowwise(kernel: str, inputs: tuple[tuple[str, str], ...], outputs: tuple[str, ...]) -> BoundsCheck:
    """The check of a kernel with one row per program: each input holds its rows at its stride, each output
    ``rows x n_cols`` contiguous elements."""

    def check(args: Mapping[str, Any], grid: tuple[int, ...]) -> None:
        rows, n_cols = grid_rows(grid), int_argument(args, "n_cols", kernel)
        if rows == 0 or n_cols == 0:
            return
        for name, stride in inputs:
            step = int_argument(args, stride, kernel)
            require_elements(
                args, name, (rows - 1) * step + n_cols, kernel, f"{rows} rows of {n_cols} at stride {step}"
            )
        for name in outputs:
            require_elements(args, name, rows * n_cols, kernel, f"{rows} rows of {n_cols}")

    return check
