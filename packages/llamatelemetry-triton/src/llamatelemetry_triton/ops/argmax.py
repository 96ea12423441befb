"""Arg-max of the last dimension: ``torch.argmax(x, dim=-1)``, exactly (greedy decoding's choice of token).

The index of the largest element of each row, as int64, with ``torch.argmax``'s rules: the first of equal
maxima (``-0.0`` equals ``0.0``), and NaN above every number (the first NaN wins). A row of 128256 logits is
cut into chunks so that a few rows still fill the GPU (``torch.argmax`` reduces a row per block: about 40 us for
1 to 64 rows of that vocabulary on an H200, whatever the row count). Each program walks its chunk in blocks,
every lane keeping its largest value and that value's first index (compares in fp32, exact for fp16, bf16 and
fp32); the lanes are then combined through one int64 key per lane, ``(order of the value) << 32 | (2^32 - 1 -
index)``, whose maximum is the largest value at its smallest index. One chunk per row stores the index; several
store their keys, and a second launch takes each row's largest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llamatelemetry_core.environment import triton_interpreter_enabled
from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_triton._aot_shapes import TYPE_NAMES, VOCAB_SIZE, kernel_build
from llamatelemetry_triton._bounds import int_argument, require_elements
from llamatelemetry_triton._compat import tl, triton
from llamatelemetry_triton._dispatch import (
    TritonOperation,
    check_float_tensor,
    cuda_in_triton_dtypes,
    described,
    device_info,
    run_op,
    triton_errors,
)
from llamatelemetry_triton._launch import on_device, rows_of
from llamatelemetry_triton.heuristics import LaunchConfig, argmax_config, current_max_block_size, next_power_of_2
from llamatelemetry_triton.registry import BuiltinEntry, KernelConfig

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from typing import Any

    from llamatelemetry_core.aot import KernelBuild
    from llamatelemetry_core.device import DeviceInfo

__all__ = ["argmax_reference", "triton_argmax"]

_MAX_COLS = 2**31 - 1  # indices are int32 inside the kernels
_NO_KEY = -(2**63)  # the int64 key of a lane that saw no element


def argmax_reference(x: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(x, dim=-1)``: the specification."""
    return torch.argmax(x, dim=-1)


# --- kernels ----------------------------------------------------------------------------------------------


@triton.jit
def _lane_best(best, first, x, idx, mask):  # type: ignore[no-untyped-def]
    """Each lane's largest value and its first index after seeing ``x`` at ``idx``: a larger value, a NaN over a
    number, or the lane's first element replaces them; an equal one does not (the earlier index stays)."""
    take = mask & ((x > best) | ((x != x) & (best == best)) | (first < 0))
    return tl.where(take, x, best), tl.where(take, idx, first)


@triton.jit
def _keys(best, first):  # type: ignore[no-untyped-def]
    """int64 keys whose order is the values' (NaN above all, ``-0.0 == 0.0``), then the smaller index."""
    value = tl.where(best == 0.0, 0.0, best)
    bits = value.to(tl.int32, bitcast=True)
    order = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    order = tl.where(value != value, 0x7FFFFFFF, order)
    key = (order.to(tl.int64) << 32) | (4294967295 - first.to(tl.int64))
    return tl.where(first >= 0, key, -9223372036854775808)


@triton.jit
def _index_of(key):  # type: ignore[no-untyped-def]
    return 4294967295 - (key & 4294967295)


@triton.jit  # type: ignore[untyped-decorator]
def _argmax_chunk_kernel(  # type: ignore[no-untyped-def]
    X,
    P,
    Out,
    stride_x,
    n_cols,
    chunk,
    splits,
    SINGLE: tl.constexpr,
    PIPELINED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Program ``(row, part)``: the best key of ``X[row, part * chunk : (part + 1) * chunk]``, stored in
    ``P[row * splits + part]``; with ``SINGLE`` (one chunk per row), its index in ``Out[row]``."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    lo = part * chunk
    hi = tl.minimum(lo + chunk, n_cols)
    base = X + row.to(tl.int64) * stride_x
    offsets = tl.arange(0, BLOCK_SIZE)
    best = tl.full([BLOCK_SIZE], float("-inf"), tl.float32)
    first = tl.full([BLOCK_SIZE], -1, tl.int32)
    if PIPELINED:
        for start in range(lo, hi, BLOCK_SIZE):
            idx = start + offsets
            mask = idx < hi
            x = tl.load(base + idx, mask=mask, other=float("-inf"), eviction_policy="evict_first").to(tl.float32)
            best, first = _lane_best(best, first, x, idx, mask)
    else:
        # `while`, not `range()`: Triton 3.6's interpreter cannot take runtime range() bounds under NumPy 2.4.
        start = lo
        while start < hi:
            idx = start + offsets
            mask = idx < hi
            x = tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32)
            best, first = _lane_best(best, first, x, idx, mask)
            start += BLOCK_SIZE
    key = tl.max(_keys(best, first), axis=0)
    if SINGLE:
        tl.store(Out + row, _index_of(key))
    else:
        tl.store(P + row.to(tl.int64) * splits + part, key)


@triton.jit  # type: ignore[untyped-decorator]
def _argmax_combine_kernel(P, Out, splits, SPLITS_BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    """``Out[row]``: the index in the largest of the row's ``splits`` keys."""
    row = tl.program_id(0)
    offsets = tl.arange(0, SPLITS_BLOCK)
    keys = tl.load(P + row.to(tl.int64) * splits + offsets, mask=offsets < splits, other=-9223372036854775808)
    tl.store(Out + row, _index_of(tl.max(keys, axis=0)))


# --- launcher ---------------------------------------------------------------------------------------------


def _launch_config(n_rows: int, like: torch.Tensor) -> LaunchConfig:
    return argmax_config(n_rows, like.shape[-1], device_info(like.device), max_block=current_max_block_size())


def _argmax_forward(x: torch.Tensor) -> torch.Tensor:
    """Arg-max of the last dimension of ``x`` (at least one element per row), ``x.shape[:-1]`` int64."""
    out = torch.empty(x.shape[:-1], dtype=torch.int64, device=x.device)
    if out.numel() == 0:
        return out
    x2, n_rows, stride_x = rows_of(x)
    config = _launch_config(n_rows, x)
    single = config.splits == 1
    keys = out if single else torch.empty((n_rows, config.splits), dtype=torch.int64, device=x.device)
    with on_device(x):
        _argmax_chunk_kernel[(n_rows, config.splits)](
            x2,
            keys,
            out,
            stride_x,
            x.shape[-1],
            config.chunk_size,
            config.splits,
            SINGLE=single,
            PIPELINED=x.is_cuda,
            BLOCK_SIZE=config.block_size,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        if not single:
            _argmax_combine_kernel[(n_rows,)](
                keys, out, config.splits, SPLITS_BLOCK=next_power_of_2(config.splits), num_warps=1
            )
    return out


@torch.library.custom_op("llamatelemetry::triton_argmax", mutates_args=())
def _argmax_op(x: torch.Tensor) -> torch.Tensor:
    return _argmax_forward(x)


@_argmax_op.register_fake
def _argmax_fake(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.int64)


@triton_errors("argmax")
def _argmax_triton(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        scalar: torch.Tensor = _argmax_triton(x.reshape(1))
        return scalar.reshape(())
    result: torch.Tensor = run_op(torch.ops.llamatelemetry.triton_argmax, _argmax_forward, x)
    return result


def _describe(x: torch.Tensor) -> Any:
    too_long = x.dim() > 0 and x.shape[-1] > _MAX_COLS
    return described(x, triton_unsupported=f"takes rows of at most {_MAX_COLS} elements" if too_long else None)


ARGMAX = TritonOperation(
    "triton.argmax",
    argmax_reference,
    _argmax_triton,
    describe=_describe,
    traceable=cuda_in_triton_dtypes,
    aliases=("argmax",),
)


def triton_argmax(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The index of the largest element along the last dimension of ``x``: ``torch.argmax(x, dim=-1)``.

    ``x [..., n]`` (fp16, bf16 or fp32 on the kernel; any float dtype through the reference, any strides) gives
    int64 ``[...]``; the first of equal maxima wins, and NaN counts as larger than any number, as in
    ``torch.argmax``. Not differentiable (an index). Raises :class:`ConfigurationError` for a last dimension of
    size 0 (no element to choose).
    """
    check_float_tensor(x, "x")
    if x.dim() > 0 and x.shape[-1] == 0:
        raise ConfigurationError(
            f"expected at least one element along the last dimension of x, got shape {list(x.shape)}: an arg-max "
            "of nothing has no index"
        )
    return ARGMAX(x, backend=backend)  # type: ignore[no-any-return]


# --- ahead-of-time builds ----------------------------------------------------------------------------------


def aot_builds(device: DeviceInfo, dtype: torch.dtype) -> Iterator[KernelBuild]:
    """The builds of a greedy step's arg-max over Llama 3's vocabulary (1 and 64 rows: chunked and combined)."""
    t = TYPE_NAMES[dtype]
    types = {"X": f"*{t}", "P": "*i64", "Out": "*i64"}
    for rows in (1, 64):
        config = argmax_config(rows, VOCAB_SIZE, device)
        tag = f"{t},{rows}x{VOCAB_SIZE},BLOCK={config.block_size},splits={config.splits}"
        constexprs = {"SINGLE": config.splits == 1, "PIPELINED": True, "BLOCK_SIZE": config.block_size}
        yield kernel_build(
            f"triton.argmax_chunk[{tag}]",
            _argmax_chunk_kernel,
            types,
            constexprs,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        if config.splits > 1:
            yield kernel_build(
                f"triton.argmax_combine[{tag}]",
                _argmax_combine_kernel,
                types,
                {"SPLITS_BLOCK": next_power_of_2(config.splits)},
                num_warps=1,
            )


# --- registry entry -------------------------------------------------------------------------------------------


def _check_chunks(args: Mapping[str, Any], grid: tuple[int, ...]) -> None:
    """``grid = (rows, splits)``: X holds the rows at ``stride_x``; P a key per program (or Out an index per row
    with SINGLE)."""
    rows, splits = grid[0], grid[1] if len(grid) > 1 else 1
    n_cols = int_argument(args, "n_cols", "argmax")
    if rows == 0 or n_cols == 0:
        return
    stride = int_argument(args, "stride_x", "argmax")
    require_elements(args, "X", (rows - 1) * stride + n_cols, "argmax", f"{rows} rows of {n_cols} at stride {stride}")
    if args.get("SINGLE"):
        require_elements(args, "Out", rows, "argmax", f"an index for each of {rows} rows")
    else:
        require_elements(args, "P", rows * splits, "argmax", f"{rows} x {splits} chunk keys")


def registry_entries() -> dict[str, BuiltinEntry]:
    """The chunk kernel in the registry (``get_kernel("argmax")``): with ``SINGLE``, a whole row per program."""
    # The interpreter runs `while` loops (see the kernel).
    meta = {"SINGLE": True, "PIPELINED": not triton_interpreter_enabled()}
    doc = "row arg-max, a row (SINGLE) or a chunk per program; (X, P, Out, stride_x, n_cols, chunk, splits)"
    config = KernelConfig("argmax", 1024, 4, 1, meta=meta, description=doc)
    return {"argmax": (_argmax_chunk_kernel, config, _check_chunks)}
