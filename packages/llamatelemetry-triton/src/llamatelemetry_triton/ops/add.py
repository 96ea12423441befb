"""Elementwise addition with PyTorch's broadcasting and type promotion: ``out = a + b``.

The result has the broadcast shape of ``a`` and ``b`` and the dtype ``torch.result_type(a, b)``; it is
contiguous. Same-shape contiguous operands take a flat kernel (one 8 KiB block of each operand per program);
anything else (broadcasting, strided views) takes a kernel that walks the output in order and computes each
operand's offset from up to four dimensions, after merging the dimensions that are contiguous in every operand
(a ``[B, S, H]`` tensor plus an ``[H]`` bias is two dimensions, so most broadcasts fit). The add is done in fp32
and rounded once, as PyTorch does for fp16 and bf16.

Where the kernel does not apply (integer or float64 operands, operands on different devices) the PyTorch
reference runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from llamatelemetry_core.validation import dtype_name
from llamatelemetry_triton._aot_shapes import HIDDEN_SIZES, ROWS, TYPE_NAMES
from llamatelemetry_triton._bounds import int_argument, require_elements
from llamatelemetry_triton._compat import tl, triton
from llamatelemetry_triton._dispatch import (
    TRITON_DTYPES,
    TritonOperation,
    described,
    device_info,
    needs_autograd,
    run_op,
    triton_errors,
)
from llamatelemetry_triton._launch import on_device
from llamatelemetry_triton.heuristics import elementwise_config
from llamatelemetry_triton.registry import BuiltinEntry, KernelConfig

if TYPE_CHECKING:
    from collections.abc import Iterator

    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = ["AddFunction", "add_reference", "triton_add"]

_MAX_DIMS = 4


def add_reference(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    """``torch.add(a, b)``: the specification."""
    return torch.add(a, b)


@triton.jit  # type: ignore[untyped-decorator]
def _add_kernel(A, B, Out, n_elements, BLOCK_SIZE: tl.constexpr):  # type: ignore[no-untyped-def]
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    a = tl.load(A + offsets, mask=mask).to(tl.float32)
    b = tl.load(B + offsets, mask=mask).to(tl.float32)
    tl.store(Out + offsets, (a + b).to(Out.dtype.element_ty), mask=mask)


@triton.jit  # type: ignore[untyped-decorator]
def _add_strided_kernel(  # type: ignore[no-untyped-def]
    A,
    B,
    Out,
    n_elements,
    size1,
    size2,
    size3,
    a_stride0,
    a_stride1,
    a_stride2,
    a_stride3,
    b_stride0,
    b_stride1,
    b_stride2,
    b_stride3,
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    i3 = offsets % size3
    rest = offsets // size3
    i2 = rest % size2
    rest = rest // size2
    i1 = rest % size1
    i0 = rest // size1
    a_offsets = i0 * a_stride0 + i1 * a_stride1 + i2 * a_stride2 + i3 * a_stride3
    b_offsets = i0 * b_stride0 + i1 * b_stride1 + i2 * b_stride2 + i3 * b_stride3
    a = tl.load(A + a_offsets, mask=mask).to(tl.float32)
    b = tl.load(B + b_offsets, mask=mask).to(tl.float32)
    tl.store(Out + offsets, (a + b).to(Out.dtype.element_ty), mask=mask)


def _merge_dims(shape: tuple[int, ...], *strides: tuple[int, ...]) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 dimensions and merge neighbours that are contiguous with each other in every operand."""
    sizes: list[int] = []
    merged: list[list[int]] = [[] for _ in strides]
    for dim, size in enumerate(shape):
        if size == 1:
            continue
        if sizes and all(m[-1] == s[dim] * size for m, s in zip(merged, strides, strict=True)):
            sizes[-1] *= size
            for m, s in zip(merged, strides, strict=True):
                m[-1] = s[dim]
            continue
        sizes.append(size)
        for m, s in zip(merged, strides, strict=True):
            m.append(s[dim])
    return sizes, merged


def _add_forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    flat = a.shape == b.shape and a.is_contiguous() and b.is_contiguous()
    shape = a.shape if flat else torch.broadcast_shapes(a.shape, b.shape)  # type: ignore[no-untyped-call]
    dtype = a.dtype if a.dtype == b.dtype else torch.result_type(a, b)
    out = torch.empty(shape, dtype=dtype, device=a.device)
    n = out.numel()
    if n == 0:
        return out
    device = device_info(a.device)
    with on_device(a):
        if flat:
            config = elementwise_config(n, out.dtype, device)
            grid = (triton.cdiv(n, config.block_size),)
            _add_kernel[grid](
                a, b, out, n, BLOCK_SIZE=config.block_size, num_warps=config.num_warps, enable_fp_fusion=True
            )
            return out
        config = elementwise_config(n, out.dtype, device, strided=True)
        grid = (triton.cdiv(n, config.block_size),)
        a_full, b_full = a.expand(shape), b.expand(shape)
        sizes, (a_strides, b_strides) = _merge_dims(tuple(shape), a_full.stride(), b_full.stride())
        if len(sizes) > _MAX_DIMS:  # rare: materialize the operands, which then merge to one dimension
            a_full, b_full = a_full.contiguous(), b_full.contiguous()
            sizes, (a_strides, b_strides) = _merge_dims(tuple(shape), a_full.stride(), b_full.stride())
        pad = _MAX_DIMS - len(sizes)
        sizes = [1] * pad + sizes
        a_strides = [0] * pad + a_strides
        b_strides = [0] * pad + b_strides
        _add_strided_kernel[grid](
            a_full,
            b_full,
            out,
            n,
            sizes[1],
            sizes[2],
            sizes[3],
            *a_strides,
            *b_strides,
            BLOCK_SIZE=config.block_size,
            num_warps=config.num_warps,
            enable_fp_fusion=True,
        )
    return out


@torch.library.custom_op("llamatelemetry::triton_add", mutates_args=())
def _add_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _add_forward(a, b)


@_add_op.register_fake
def _add_fake(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.result_type(a, b), device=a.device)  # type: ignore[no-untyped-call]


class AddFunction(torch.autograd.Function):
    """``a + b`` with broadcasting; the backward sums the gradient back to each operand's shape."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.shapes = (a.shape, b.shape)
        ctx.dtypes = (a.dtype, b.dtype)
        out: torch.Tensor = run_op(torch.ops.llamatelemetry.triton_add, _add_forward, a, b)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        grads: list[torch.Tensor | None] = []
        for i, (shape, dtype) in enumerate(zip(ctx.shapes, ctx.dtypes, strict=True)):
            grads.append(grad.sum_to_size(shape).to(dtype) if ctx.needs_input_grad[i] else None)
        return grads[0], grads[1]


def _unsupported(a: torch.Tensor, b: torch.Tensor | float) -> str | None:
    if not isinstance(b, torch.Tensor):
        return None
    if b.device != a.device:
        return f"operands on different devices ({a.device}, {b.device})"
    for name, t in (("a", a), ("b", b)):
        if t.dtype not in TRITON_DTYPES:
            return f"{name} is {dtype_name(t.dtype)}; the kernel adds float16, bfloat16 and float32"
    return None


@triton_errors("add")
def _add_triton(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
    if not isinstance(b, torch.Tensor):  # a float a keeps its dtype beside a number (what result_type says)
        b = torch.full((), b, dtype=a.dtype if a.is_floating_point() else torch.result_type(a, b), device=a.device)
    if needs_autograd(a, b):
        out: torch.Tensor = AddFunction.apply(a, b)  # type: ignore[no-untyped-call]
        return out
    result: torch.Tensor = run_op(torch.ops.llamatelemetry.triton_add, _add_forward, a, b)
    return result


ADD = TritonOperation(
    "triton.add",
    add_reference,
    _add_triton,
    describe=lambda a, b: described(
        a, b if isinstance(b, torch.Tensor) else None, triton_unsupported=_unsupported(a, b)
    ),
    # Not torch.result_type, which Dynamo cannot trace (it returns a dtype): a float ``a`` of the kernel's dtypes
    # with a number, or two tensors both of them (``_unsupported``), promote to one of those dtypes.
    traceable=lambda a, b: a.is_cuda and a.dtype in TRITON_DTYPES and _unsupported(a, b) is None,
    aliases=("add",),
)


def triton_add(a: torch.Tensor, b: torch.Tensor | float, *, backend: str | None = None) -> torch.Tensor:
    """``a + b`` with PyTorch's broadcasting and type promotion; ``b`` may be a Python number.

    Differentiable in both operands. The Triton kernel handles float16/bfloat16/float32 tensors on one device;
    other cases run ``torch.add``. Raises ``TypeError`` when ``a`` is not a tensor.
    """
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"expected a to be a torch.Tensor, got {type(a).__name__}")
    if not isinstance(b, torch.Tensor | int | float):
        raise TypeError(f"expected b to be a torch.Tensor or a Python number, got {type(b).__name__}")
    return ADD(a, b, backend=backend)  # type: ignore[no-any-return]


# --- ahead-of-time builds ----------------------------------------------------------------------------------


def aot_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """Every build of this module's kernels as they would be launched on ``device`` in ``dtype``, for the
    representative shapes (the ahead-of-time checks, :mod:`llamatelemetry_triton.aot`)."""
    from llamatelemetry_core.aot import KernelBuild

    t = TYPE_NAMES[dtype]
    for hidden in HIDDEN_SIZES:
        config = elementwise_config(ROWS * hidden, dtype, device)
        yield KernelBuild(
            f"triton.add[{t},BLOCK={config.block_size}]",
            _add_kernel,
            {"A": f"*{t}", "B": f"*{t}", "Out": f"*{t}", "n_elements": "i32", "BLOCK_SIZE": "constexpr"},
            {"BLOCK_SIZE": config.block_size},
            num_warps=config.num_warps,
        )
        strided = {
            "A": f"*{t}",
            "B": f"*{t}",
            "Out": f"*{t}",
            **dict.fromkeys(("n_elements", "size1", "size2", "size3"), "i32"),
            **dict.fromkeys((f"{x}_stride{i}" for x in "ab" for i in range(4)), "i32"),
            "BLOCK_SIZE": "constexpr",
        }
        config = elementwise_config(ROWS * hidden, dtype, device, strided=True)
        yield KernelBuild(
            f"triton.add_broadcast[{t},BLOCK={config.block_size}]",
            _add_strided_kernel,
            strided,
            {"BLOCK_SIZE": config.block_size},
            num_warps=config.num_warps,
        )


# --- registry entries ---------------------------------------------------------------------------------------


def _add_bounds(args: Mapping[str, Any], grid: tuple[int, ...]) -> None:
    n = int_argument(args, "n_elements", "add")
    for name in ("A", "B", "Out"):
        require_elements(args, name, n, "add", f"n_elements = {n}")


def registry_entries() -> dict[str, BuiltinEntry]:
    """This module's kernels in the registry (``get_kernel(name)``): kernel, default launch config, bounds check."""
    config = KernelConfig("add", 1024, 4, 1, description="out = a + b; (A, B, Out, n)")
    return {"add": (_add_kernel, config, _add_bounds)}
