"""``KVCacheConfig``: the sizes of a KV cache, validated when built, and what it will cost in memory.

A cache holds, per layer, keys and values of ``max_batch_size`` sequences of up to ``max_seq_length`` tokens,
``num_kv_heads`` heads of ``head_dim`` each. ``dtype`` is the dtype of the K/V the model computes (and what the
cache hands back); ``kv_dtype`` is how they are stored: the same dtype, or quantized (``torch.int8``, or
``torch.float8_e4m3fn`` on GPUs with fp8) with one float32 scale per token and head beside them.

Memory is checked before anything is allocated: :meth:`KVCacheConfig.check_fits` compares the bytes a cache
needs with what the device has and raises :class:`~llamatelemetry_core.errors.CapacityError` with both numbers.
On a GPU the comparison is against free memory (CUDA memory is committed when allocated). On a CPU the storage is
allocated with ``torch.empty`` and the operating system commits it page by page as tokens are written, so a
cache is refused only when it is larger than the machine's physical memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamatelemetry_core.device import DeviceInfo, get_device_info
from llamatelemetry_core.errors import CapabilityError, CapacityError, ConfigurationError
from llamatelemetry_core.kv_layout import QUANTIZED_KV_DTYPES
from llamatelemetry_core.validation import check_positive_int, dtype_name

__all__ = ["MODEL_DTYPES", "KVCacheConfig", "check_kv_dtype_supported", "format_bytes"]

MODEL_DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16, torch.float32})
"""Dtypes of the keys and values a model computes (``KVCacheConfig.dtype``)."""

_FP8 = getattr(torch, "float8_e4m3fn", None)
_SCALE_BYTES = 4  # one float32 scale per token and head of quantized storage


def format_bytes(n: int) -> str:
    """``17179869184`` -> ``"16.00 GiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.2f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def check_kv_dtype_supported(kv_dtype: torch.dtype, device: DeviceInfo) -> None:
    """Raise :class:`CapabilityError` when ``device`` cannot hold K/V stored as ``kv_dtype``.

    fp8 (e4m3) storage needs a GPU with fp8 (compute capability >= 8.9: Ada, Hopper and newer); a CPU stores it
    through PyTorch's casts (the reference path). int8 and the float dtypes are supported everywhere.
    """
    if _FP8 is not None and kv_dtype == _FP8 and device.is_cuda and not device.supports_fp8:
        cc = device.compute_capability
        got = "unknown" if cc is None else f"{cc[0]}.{cc[1]}"
        raise CapabilityError(
            f"float8_e4m3fn KV storage needs a GPU with fp8 (compute capability >= 8.9: Ada, Hopper); "
            f"{device.name} has compute capability {got}; use kv_dtype=torch.int8, which halves KV memory on any GPU"
        )


@dataclass(frozen=True, init=False)
class KVCacheConfig:
    """Sizes and dtypes of a KV cache.

    * ``max_batch_size``, ``max_seq_length``: sequences held at once and tokens per sequence.
    * ``num_layers``, ``num_heads``, ``head_dim``: the model's decoder layers, query heads and head size.
    * ``dtype``: dtype of the K/V the model writes and reads back (float16, bfloat16 or float32).
    * ``num_kv_heads``: key/value heads (grouped-query models); ``None`` means ``num_heads``. Must divide
      ``num_heads``.
    * ``device``: where the cache lives; ``None`` means the current CUDA device, else the CPU.
    * ``kv_dtype``: storage dtype; ``None`` means ``dtype``; ``torch.int8`` or ``torch.float8_e4m3fn`` store
      K/V quantized with per-token, per-head float32 scales (fp8 only where the GPU has it).

    Raises :class:`ConfigurationError` (a ``ValueError``) for invalid values and :class:`CapabilityError` for fp8
    storage on a GPU without fp8.
    """

    max_batch_size: int
    max_seq_length: int
    num_layers: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    num_kv_heads: int
    device: torch.device
    kv_dtype: torch.dtype

    def __init__(
        self,
        max_batch_size: int,
        max_seq_length: int,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        num_kv_heads: int | None = None,
        device: torch.device | str | int | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("max_seq_length", max_seq_length),
            ("num_layers", num_layers),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
        ):
            check_positive_int(value, name)
        given: object = dtype
        if not isinstance(given, torch.dtype) or given not in MODEL_DTYPES:
            names = ", ".join(sorted(dtype_name(d) for d in MODEL_DTYPES))
            raise ConfigurationError(f"expected dtype in {{{names}}} (the dtype of the model's K/V), got {dtype!r}")
        kv_heads = num_heads if num_kv_heads is None else check_positive_int(num_kv_heads, "num_kv_heads")
        if num_heads % kv_heads:
            raise ConfigurationError(
                f"expected num_kv_heads to divide num_heads (grouped-query attention), got num_heads={num_heads}, "
                f"num_kv_heads={kv_heads}"
            )
        storage = dtype if kv_dtype is None else kv_dtype
        if storage != dtype and storage not in QUANTIZED_KV_DTYPES:
            names = ", ".join(sorted(dtype_name(d) for d in QUANTIZED_KV_DTYPES))
            raise ConfigurationError(
                f"expected kv_dtype None (store as {dtype_name(dtype)}) or a quantized dtype in {{{names}}}, got "
                f"{storage!r}; to store another float dtype, build the cache with dtype={storage!r}"
            )
        resolved = _resolve_device(device)
        # Under a simulated device, an unspecified device answers as the simulated GPU (the policy to preview);
        # the storage itself still goes where it can (the CPU here).
        check_kv_dtype_supported(storage, get_device_info(None if device is None else resolved, refresh_memory=False))
        object.__setattr__(self, "max_batch_size", max_batch_size)
        object.__setattr__(self, "max_seq_length", max_seq_length)
        object.__setattr__(self, "num_layers", num_layers)
        object.__setattr__(self, "num_heads", num_heads)
        object.__setattr__(self, "head_dim", head_dim)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "num_kv_heads", kv_heads)
        object.__setattr__(self, "device", resolved)
        object.__setattr__(self, "kv_dtype", storage)

    @property
    def quantized(self) -> bool:
        """Whether K/V are stored quantized, with scales."""
        return self.kv_dtype in QUANTIZED_KV_DTYPES

    def bytes_per_token(self) -> int:
        """Bytes one token takes in K and V of one layer, scales included."""
        itemsize = self.kv_dtype.itemsize
        per_head = self.head_dim * itemsize + (_SCALE_BYTES if self.quantized else 0)
        return 2 * self.num_kv_heads * per_head

    def nbytes(self) -> int:
        """Bytes of a contiguous cache of this config (every layer, K, V and scales)."""
        return self.num_layers * self.max_batch_size * self.max_seq_length * self.bytes_per_token()

    def memory_report(self) -> str:
        """One line: what the cache holds and what it costs."""
        return (
            f"{self.num_layers} layers x {self.max_batch_size} sequences x {self.max_seq_length} tokens x "
            f"{self.num_kv_heads} KV heads x {self.head_dim} ({dtype_name(self.kv_dtype)}"
            f"{' + float32 scales' if self.quantized else ''}, K and V): {format_bytes(self.nbytes())}"
        )

    def check_fits(self, nbytes: int | None = None, *, what: str = "KV cache") -> None:
        """Raise :class:`CapacityError` when ``nbytes`` (default: :meth:`nbytes`) do not fit on the device.

        A GPU is compared with its free memory now, a CPU with its physical memory (see the module docstring).
        """
        need = self.nbytes() if nbytes is None else nbytes
        info = get_device_info(self.device)
        if info.is_cuda:
            have, kind = info.free_memory_bytes, "free"
        else:
            have, kind = info.total_memory_bytes or None, "physical"
        if have is not None and need > have:
            raise CapacityError(
                f"the {what} needs {format_bytes(need)} but {info.name} has {format_bytes(have)} {kind} memory; "
                "lower max_batch_size or max_seq_length, use fewer blocks, or store K/V as int8 "
                "(kv_dtype=torch.int8 halves it against float16)"
            )


def _resolve_device(device: torch.device | str | int | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(f"expected device to be a torch.device, a string or an int, got {device!r}") from exc
    if resolved.type not in ("cuda", "cpu"):
        raise ConfigurationError(f"expected a cuda or cpu device, got {resolved}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise CapabilityError(f"asked for a cache on {resolved} but CUDA is not available here; use device='cpu'")
        index: int | None = resolved.index  # None for a bare "cuda"
        if index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved
