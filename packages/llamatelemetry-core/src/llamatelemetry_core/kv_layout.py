"""The paged KV layout: the one description the cache that stores and the attention that reads agree on.

``llamatelemetry-kvcache`` writes keys and values into this layout and ``llamatelemetry-flashattn`` reads them;
neither imports the other, both import this module (vLLM's ``AttentionBackend.get_kv_cache_shape`` plays the same
role). One layer's paged store is a :class:`PagedKV`:

* ``key_cache``, ``value_cache``: ``[num_blocks, page_size, num_kv_heads, head_dim]``, contiguous. Block ``b``
  holds the tokens ``b`` was assigned in the block table of each sequence that references it; token ``t`` of a
  sequence lives in block ``block_table[t // page_size]`` at offset ``t % page_size``.
* Quantized storage (``int8``, or ``float8_e4m3fn`` where the GPU has fp8): ``key_scale``, ``value_scale`` of
  shape ``[num_blocks, page_size, num_kv_heads]`` and dtype float32 hold one symmetric scale per token and head:
  the stored value ``q`` stands for ``q * scale``. Unquantized storage (fp16, bf16, fp32) has no scales.

Per-step metadata, built once per step on the host and shared by every layer:

* ``block_tables``: int32 ``[batch, max_blocks_per_seq]``; row ``i`` lists sequence ``i``'s blocks in order.
  Entries past ``ceil(seq_lens[i] / page_size)`` are padding (:data:`PAD_BLOCK`) and are never read.
* ``seq_lens``: int32 ``[batch]``: tokens in the cache for each sequence, the ones written this step included.
* ``slot_mapping``: int64 ``[num_tokens]``: where each new token is written, ``block * page_size + offset``;
  :data:`PAD_SLOT` (-1) marks a padded token that is not written.

Queries of a step are packed: ``[num_tokens, num_heads, head_dim]`` with ``cu_seqlens_q`` (int32 ``[batch + 1]``)
giving each sequence's rows; the ``n`` queries of sequence ``i`` are its last ``n`` tokens, at positions
``seq_lens[i] - n .. seq_lens[i] - 1``, so decode (``n == 1``) and a chunk of prefill over a cached prefix are the
same call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.validation import dtype_name, format_shape

__all__ = [
    "KV_DTYPES",
    "PAD_BLOCK",
    "PAD_SLOT",
    "QUANTIZED_KV_DTYPES",
    "PagedKV",
    "PagedKVLayout",
    "slot_for",
]

PAD_BLOCK = 0
"""Padding value of ``block_tables`` entries past a sequence's last block (never dereferenced)."""
PAD_SLOT = -1
"""A ``slot_mapping`` entry that writes nothing (a padded token)."""

QUANTIZED_KV_DTYPES: frozenset[torch.dtype] = frozenset(
    d for d in (torch.int8, getattr(torch, "float8_e4m3fn", None)) if d is not None
)
"""Storage dtypes that carry per-token, per-head scales."""
KV_DTYPES: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16, torch.float32}) | QUANTIZED_KV_DTYPES
"""Every storage dtype the layout allows."""


def slot_for(block: int, offset: int, page_size: int) -> int:
    """The ``slot_mapping`` value of token ``offset`` of block ``block``."""
    return block * page_size + offset


@dataclass(frozen=True)
class PagedKVLayout:
    """Sizes and storage dtype of one layer's paged KV store."""

    num_blocks: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_blocks", "page_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigurationError(f"expected {name} to be a positive int, got {value!r}")
        if self.dtype not in KV_DTYPES:
            names = ", ".join(sorted(dtype_name(d) for d in KV_DTYPES))
            raise ConfigurationError(f"expected a KV storage dtype in {{{names}}}, got {self.dtype}")

    @property
    def quantized(self) -> bool:
        """Whether values are stored quantized, with scales beside them."""
        return self.dtype in QUANTIZED_KV_DTYPES

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        """Shape of ``key_cache`` and ``value_cache``."""
        return (self.num_blocks, self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def scale_shape(self) -> tuple[int, int, int]:
        """Shape of ``key_scale`` and ``value_scale`` (quantized storage only)."""
        return (self.num_blocks, self.page_size, self.num_kv_heads)

    def bytes_per_token(self) -> int:
        """Bytes one token takes in K and V together, scales included."""
        itemsize = self.dtype.itemsize
        per_head = self.head_dim * itemsize + (4 if self.quantized else 0)
        return 2 * self.num_kv_heads * per_head

    def nbytes(self) -> int:
        """Bytes of the whole store (K, V and scales)."""
        return self.num_blocks * self.page_size * self.bytes_per_token()


@dataclass(frozen=True)
class PagedKV:
    """One layer's paged KV store in the layout described in this module."""

    key_cache: torch.Tensor
    value_cache: torch.Tensor
    key_scale: torch.Tensor | None = None
    value_scale: torch.Tensor | None = None

    @property
    def layout(self) -> PagedKVLayout:
        """The sizes and storage dtype, read from ``key_cache``."""
        num_blocks, page_size, num_kv_heads, head_dim = self.key_cache.shape
        return PagedKVLayout(num_blocks, page_size, num_kv_heads, head_dim, self.key_cache.dtype)

    def validate(self) -> PagedKVLayout:
        """Check shapes, dtypes, devices and contiguity; return the layout or raise ``ConfigurationError``."""
        if self.key_cache.dim() != 4:
            raise ConfigurationError(
                "expected key_cache of shape [num_blocks, page_size, num_kv_heads, head_dim], "
                f"got {format_shape(self.key_cache.shape)}"
            )
        layout = self.layout
        for name, tensor in (("value_cache", self.value_cache),):
            if tuple(tensor.shape) != layout.kv_shape or tensor.dtype != layout.dtype:
                raise ConfigurationError(
                    f"expected {name} of shape {format_shape(layout.kv_shape)} and dtype {dtype_name(layout.dtype)} "
                    f"like key_cache, got {format_shape(tensor.shape)} {dtype_name(tensor.dtype)}"
                )
        tensors = {"key_cache": self.key_cache, "value_cache": self.value_cache}
        scales = {"key_scale": self.key_scale, "value_scale": self.value_scale}
        if layout.quantized:
            for name, scale in scales.items():
                if scale is None:
                    raise ConfigurationError(
                        f"{dtype_name(layout.dtype)} KV storage needs {name} of shape "
                        f"{format_shape(layout.scale_shape)} (float32); got None"
                    )
                if tuple(scale.shape) != layout.scale_shape or scale.dtype != torch.float32:
                    raise ConfigurationError(
                        f"expected {name} of shape {format_shape(layout.scale_shape)} and dtype float32, got "
                        f"{format_shape(scale.shape)} {dtype_name(scale.dtype)}"
                    )
                tensors[name] = scale
        elif any(s is not None for s in scales.values()):
            raise ConfigurationError(
                f"{dtype_name(layout.dtype)} KV storage is not quantized and takes no scales; pass key_scale=None "
                "and value_scale=None"
            )
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise ConfigurationError(f"expected every paged KV tensor on one device, got {sorted(map(str, devices))}")
        for name, tensor in tensors.items():
            if not tensor.is_contiguous():
                raise ConfigurationError(f"expected {name} to be contiguous; call .contiguous() when allocating it")
        return layout
