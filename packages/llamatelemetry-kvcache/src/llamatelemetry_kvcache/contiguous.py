"""``KVCache``: a contiguous KV cache, allocated once, written in place.

Layout per layer: ``keys[layer]`` and ``values[layer]`` of shape ``[max_batch_size, max_seq_length, num_kv_heads,
head_dim]`` (the layout ``flash_attention_forward`` takes), plus float32 scales ``[max_batch_size,
max_seq_length, num_kv_heads]`` when stored quantized. Row ``i`` of the batch is sequence ``i``.

A *step* writes the new tokens of every sequence into every layer: ``update(layer, k, v)`` is called once per
layer, in any order, and the sequences' lengths advance by the new tokens once the last layer
(``num_layers - 1``) has been written (or on an explicit :meth:`KVCache.advance`, for a model that does not
update every layer). Every layer of one step therefore writes at the same positions, and ``get``/``lengths``
show the cache as of the last completed step.

Two write paths:

* :meth:`KVCache.update` with host positions (the default: each sequence's current length, or explicit
  ``positions``), ragged new-token counts allowed; returns views of the valid prefix ``[b, L]`` with
  ``L = max(position + new tokens)``. Costs a copy of the new tokens, whatever the context.
* :meth:`KVCache.update` with ``positions`` given as a device tensor: no host synchronisation and fixed
  addresses, so a decode step can be captured into a CUDA graph and replayed with new positions written into
  the same tensor. It returns views of the whole ``[b, max_seq_length]`` storage (attention masks what lies past
  each sequence's length) and leaves the host-side lengths alone; :meth:`KVCache.set_lengths` resynchronises them.

Positions past a sequence's length (padding of a ragged batch, or the whole storage on the static path) hold
finite values, never uninitialised memory that could put NaN into a masked attention sum: GPU storage is zeroed
when allocated; CPU storage (committed lazily by the operating system) is zeroed ahead of the writes, in growing
chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.validation import check_tensor, dtype_name, format_shape
from llamatelemetry_kvcache.config import KVCacheConfig
from llamatelemetry_kvcache.quant import dequantize_kv, quantize_kv

__all__ = ["KVCache"]

_MIN_CLEAN_CHUNK = 16  # tokens zeroed ahead at least, on CPU storage (then doubling)


@dataclass
class _Step:
    """The step in progress: where each sequence's new tokens go, and which layers have been written."""

    starts: list[int]
    counts: list[int]
    width: int
    layers_done: set[int] = field(default_factory=set)

    @property
    def end(self) -> int:
        return max(s + n for s, n in zip(self.starts, self.counts, strict=True))


class KVCache:
    """A preallocated ``[batch, seq, kv_heads, head_dim]`` KV cache per layer; see the module docstring.

    Raises :class:`~llamatelemetry_core.errors.CapacityError` when the cache does not fit in memory (at
    construction) or a write goes past ``max_seq_length``/``max_batch_size``, and
    :class:`~llamatelemetry_core.errors.ConfigurationError` for K/V of the wrong shape, dtype or device.
    """

    def __init__(self, config: KVCacheConfig) -> None:
        if not isinstance(config, KVCacheConfig):
            raise TypeError(f"expected a KVCacheConfig, got {type(config).__name__}")
        config.check_fits()
        self.config = config
        c = config
        shape = (c.max_batch_size, c.max_seq_length, c.num_kv_heads, c.head_dim)
        zeroed = c.device.type == "cuda"
        alloc = torch.zeros if zeroed else torch.empty
        self._keys = [alloc(shape, dtype=c.kv_dtype, device=c.device) for _ in range(c.num_layers)]
        self._values = [alloc(shape, dtype=c.kv_dtype, device=c.device) for _ in range(c.num_layers)]
        self._key_scales: list[torch.Tensor] | None = None
        self._value_scales: list[torch.Tensor] | None = None
        if c.quantized:
            scale_shape = shape[:3]
            self._key_scales = [alloc(scale_shape, dtype=torch.float32, device=c.device) for _ in range(c.num_layers)]
            self._value_scales = [alloc(scale_shape, dtype=torch.float32, device=c.device) for _ in range(c.num_layers)]
        self._rows = torch.arange(c.max_batch_size, device=c.device).unsqueeze(1)
        self._lengths = [0] * c.max_batch_size
        self._clean = [c.max_seq_length if zeroed else 0] * c.max_batch_size
        self._active = 0  # rows of the last step: what get() returns
        self._step: _Step | None = None

    # --- state ---------------------------------------------------------------------------------------------------

    @property
    def lengths(self) -> list[int]:
        """Tokens cached per sequence (row), as of the last completed step."""
        return list(self._lengths)

    @property
    def batch_size(self) -> int:
        """Rows (sequences ``0..batch_size-1``) of the last completed step: what :meth:`get` returns."""
        return self._active

    def seq_lens(self) -> torch.Tensor:
        """The lengths as an int32 tensor ``[max_batch_size]`` on the cache's device."""
        return torch.tensor(self._lengths, dtype=torch.int32, device=self.config.device)

    def nbytes(self) -> int:
        """Bytes allocated for K, V and scales over every layer."""
        tensors = [*self._keys, *self._values, *(self._key_scales or ()), *(self._value_scales or ())]
        return sum(t.numel() * t.element_size() for t in tensors)

    def storage(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw ``[max_batch_size, max_seq_length, num_kv_heads, head_dim]`` K and V of a layer (as stored)."""
        self._check_layer(layer_idx)
        return self._keys[layer_idx], self._values[layer_idx]

    def scales(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The float32 ``[max_batch_size, max_seq_length, num_kv_heads]`` scales of a quantized layer, else None."""
        self._check_layer(layer_idx)
        if self._key_scales is None or self._value_scales is None:
            return None
        return self._key_scales[layer_idx], self._value_scales[layer_idx]

    # --- reading -------------------------------------------------------------------------------------------------

    def get(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """K and V of a layer as of the last completed step, ``[b, L, num_kv_heads, head_dim]`` in ``dtype``.

        ``b`` is the batch of the last step, ``L`` its longest sequence; ``None`` when nothing is cached.
        Views of the storage (dequantized copies for quantized storage).
        """
        self._check_layer(layer_idx)
        length = max(self._lengths[: self._active], default=0)
        if length == 0:
            return None
        return self._read(layer_idx, self._active, length)

    def _read(self, layer_idx: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._keys[layer_idx][:rows, :length]
        v = self._values[layer_idx][:rows, :length]
        if self._key_scales is None or self._value_scales is None:
            return k, v
        dtype = self.config.dtype
        ks = self._key_scales[layer_idx][:rows, :length]
        vs = self._value_scales[layer_idx][:rows, :length]
        return dequantize_kv(k, ks, dtype), dequantize_kv(v, vs, dtype)

    # --- writing -------------------------------------------------------------------------------------------------

    def update(
        self,
        layer_idx: int,
        new_keys: torch.Tensor,
        new_values: torch.Tensor,
        *,
        positions: Sequence[int] | torch.Tensor | None = None,
        num_new_tokens: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``new_keys``/``new_values`` ``[b, T, num_kv_heads, head_dim]`` of sequences ``0..b-1``.

        * ``positions``: where each sequence's new tokens start; ``None`` means its current length. A device
          tensor (int32/int64 ``[b]``) takes the graph-safe path (see the module docstring).
        * ``num_new_tokens``: how many of the ``T`` rows of each sequence are real (a right-padded ragged batch);
          ``None`` means all ``T``.

        Returns ``(k, v)``: ``[b, L, num_kv_heads, head_dim]`` in ``config.dtype`` with ``L`` the longest
        sequence after this step (``max_seq_length`` on the graph-safe path). Raises ``CapacityError`` past
        ``max_seq_length`` or ``max_batch_size``.
        """
        self._check_layer(layer_idx)
        batch, width = self._check_new(new_keys, new_values)
        if isinstance(positions, torch.Tensor):
            if num_new_tokens is not None:
                raise ConfigurationError("num_new_tokens is not supported with device positions; pad with real rows")
            return self._update_static(layer_idx, new_keys, new_values, positions)
        step = self._step_for(layer_idx, batch, width, positions, num_new_tokens)
        self._write(layer_idx, new_keys, new_values, step)
        step.layers_done.add(layer_idx)
        out = self._read(layer_idx, batch, step.end)
        if layer_idx == self.config.num_layers - 1:
            self.advance()
        return out

    def advance(self) -> None:
        """Complete the step in progress: each sequence's length becomes its start plus its new tokens."""
        step = self._step
        if step is None:
            return
        for i, (start, count) in enumerate(zip(step.starts, step.counts, strict=True)):
            self._lengths[i] = start + count
        self._active = max(self._active, len(step.starts))
        self._step = None

    def clear(self) -> None:
        """Forget every sequence (storage is kept, not zeroed)."""
        self._lengths = [0] * self.config.max_batch_size
        self._active = 0
        self._step = None

    def reset(self, seq_idx: int) -> None:
        """Forget one sequence (row ``seq_idx``), so that a new one can start there."""
        self._check_row(seq_idx)
        if self._step is not None:
            raise ConfigurationError(
                f"cannot reset sequence {seq_idx} in the middle of a step (layers {sorted(self._step.layers_done)} "
                "written); finish the step (update every layer, or call advance()) first"
            )
        self._lengths[seq_idx] = 0
        while self._active and self._lengths[self._active - 1] == 0:
            self._active -= 1

    def set_lengths(self, lengths: Sequence[int] | torch.Tensor) -> None:
        """Set the host-side lengths of sequences ``0..len(lengths)-1`` (after graph-safe steps; a tensor syncs)."""
        given = lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths
        values = _ints(given, None, "lengths")
        if len(values) > self.config.max_batch_size:
            raise CapacityError(f"got {len(values)} lengths for a cache of max_batch_size={self.config.max_batch_size}")
        for i, n in enumerate(values):  # every value checked before any is set: a refused call changes nothing
            if not 0 <= n <= self.config.max_seq_length:
                raise CapacityError(
                    f"sequence {i}: length {n} is outside [0, max_seq_length={self.config.max_seq_length}]"
                )
        self._lengths[: len(values)] = values
        self._active = max(self._active, len(values))
        self._clean_active()
        self._step = None

    def select_rows(self, indices: Sequence[int]) -> None:
        """Make row ``j`` hold what row ``indices[j]`` held, for every layer (beam-search reordering, repeating
        or selecting sequences); the batch of the next ``get`` becomes ``len(indices)``."""
        c = self.config
        if self._step is not None:
            raise ConfigurationError("cannot reorder sequences in the middle of a step; finish the step first")
        rows = _ints(indices, len(indices), "indices")
        if len(rows) > c.max_batch_size:
            raise CapacityError(f"got {len(rows)} rows for a cache of max_batch_size={c.max_batch_size}")
        for r in rows:
            self._check_row(r)
        index = torch.tensor(rows, dtype=torch.long, device=c.device)
        n = len(rows)
        for tensors in (self._keys, self._values, self._key_scales or [], self._value_scales or []):
            for t in tensors:
                t[:n] = t.index_select(0, index)  # index_select copies first, so rows may repeat or swap
        self._lengths[:n] = [self._lengths[r] for r in rows]
        self._clean[:n] = [self._clean[r] for r in rows]
        self._active = n
        self._clean_active()

    def prepare_static(self, batch: int | None = None) -> None:
        """Make every position of rows ``0..batch-1`` hold finite values, ahead of graph-safe steps.

        The graph-safe path calls it itself outside capture; call it before capturing on CPU-like lazily zeroed
        storage (GPU storage is zeroed at allocation, so there it does nothing).
        """
        limit, given = self.config.max_batch_size, cast("object", batch)
        if given is not None and (isinstance(given, bool) or not isinstance(given, int) or not 0 <= given <= limit):
            raise ConfigurationError(f"expected batch in [0, max_batch_size={limit}] or None, got {batch!r}")
        rows = limit if batch is None else batch
        self._clean_rows(range(rows), self.config.max_seq_length)

    # --- internals -----------------------------------------------------------------------------------------------

    def _check_layer(self, layer_idx: object) -> None:
        n = self.config.num_layers
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or not 0 <= layer_idx < n:
            raise ConfigurationError(f"expected layer_idx in [0, {n}) (num_layers={n}), got {layer_idx!r}")

    def _check_row(self, seq_idx: object) -> None:
        n = self.config.max_batch_size
        if isinstance(seq_idx, bool) or not isinstance(seq_idx, int) or not 0 <= seq_idx < n:
            raise ConfigurationError(f"expected a sequence index in [0, {n}) (max_batch_size={n}), got {seq_idx!r}")

    def _check_new(self, new_keys: object, new_values: object) -> tuple[int, int]:
        c = self.config
        k = check_tensor(new_keys, "new_keys")
        v = check_tensor(new_values, "new_values")
        for name, t in (("new_keys", k), ("new_values", v)):
            if t.dim() != 4 or t.shape[2] != c.num_kv_heads or t.shape[3] != c.head_dim or 0 in t.shape[:2]:
                raise ConfigurationError(
                    f"expected {name} of shape [batch >= 1, new_tokens >= 1, num_kv_heads={c.num_kv_heads}, "
                    f"head_dim={c.head_dim}], got {format_shape(t.shape)}"
                )
            if t.dtype != c.dtype:
                raise ConfigurationError(
                    f"expected {name} of dtype {dtype_name(c.dtype)} (the cache's dtype), got {dtype_name(t.dtype)}"
                )
            if t.device != c.device:
                raise ConfigurationError(f"expected {name} on {c.device} (the cache's device), got {t.device}")
        if k.shape != v.shape:
            raise ConfigurationError(
                "expected new_keys and new_values of one shape, got "
                f"{format_shape(k.shape)} and {format_shape(v.shape)}"
            )
        batch, width = int(k.shape[0]), int(k.shape[1])
        if batch > c.max_batch_size:
            raise CapacityError(
                f"got a batch of {batch} sequences for a cache of max_batch_size={c.max_batch_size}; "
                "build the cache with a larger max_batch_size"
            )
        return batch, width

    def _step_for(
        self,
        layer_idx: int,
        batch: int,
        width: int,
        positions: Sequence[int] | None,
        num_new_tokens: Sequence[int] | None,
    ) -> _Step:
        c = self.config
        starts = self._lengths[:batch] if positions is None else _ints(positions, batch, "positions")
        counts = [width] * batch if num_new_tokens is None else _ints(num_new_tokens, batch, "num_new_tokens")
        step = self._step
        if step is not None:
            if layer_idx in step.layers_done:
                raise ConfigurationError(
                    f"layer {layer_idx} was already written in this step; a step writes every layer once "
                    f"(layers {sorted(step.layers_done)} done, the step ends with layer {c.num_layers - 1}), "
                    "or call advance() to end it early"
                )
            if (positions is not None and starts != step.starts) or counts != step.counts or width != step.width:
                raise ConfigurationError(
                    f"layer {layer_idx} writes other positions than the step in progress (started at "
                    f"{step.starts} with {step.counts} tokens, got {starts} with {counts}); finish the step first"
                )
            return step
        for i, (start, count) in enumerate(zip(starts, counts, strict=True)):
            if not 1 <= count <= width:
                raise ConfigurationError(
                    f"sequence {i}: expected between 1 and {width} new tokens (num_new_tokens; new_keys has {width}), "
                    f"got {count}"
                )
            if start < 0:
                raise ConfigurationError(f"sequence {i}: expected positions >= 0, got {start}")
            if start + count > c.max_seq_length:
                raise CapacityError(
                    f"sequence {i} would hold {start + count} tokens ({start} cached + {count} new) but the cache "
                    f"holds max_seq_length={c.max_seq_length}; build it with a larger max_seq_length"
                )
        step = _Step(list(starts), counts, width)
        # Every row get() will return, not only this step's: a shorter row is read up to the longest one.
        self._clean_rows(range(max(batch, self._active)), step.end)
        self._step = step
        return step

    def _clean_active(self) -> None:
        """Make the rows :meth:`get` returns hold finite values up to the longest of them."""
        self._clean_rows(range(self._active), max(self._lengths[: self._active], default=0))

    def _clean_rows(self, rows: range, upto: int) -> None:
        """Zero positions ``clean[i] .. >= upto`` of each row (CPU storage only), ahead in growing chunks."""
        limit = self.config.max_seq_length
        for i in rows:
            lo = self._clean[i]
            if lo >= upto:
                continue
            hi = min(limit, max(upto, 2 * lo, lo + _MIN_CLEAN_CHUNK))
            for tensors in (self._keys, self._values, self._key_scales or [], self._value_scales or []):
                for t in tensors:
                    t[i, lo:hi].zero_()
            self._clean[i] = hi

    def _write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, step: _Step) -> None:
        pairs: list[tuple[torch.Tensor, torch.Tensor]]
        if self._key_scales is not None and self._value_scales is not None:
            kq, ks = quantize_kv(k, self.config.kv_dtype)
            vq, vs = quantize_kv(v, self.config.kv_dtype)
            pairs = [
                (self._keys[layer_idx], kq),
                (self._values[layer_idx], vq),
                (self._key_scales[layer_idx], ks),
                (self._value_scales[layer_idx], vs),
            ]
        else:
            pairs = [(self._keys[layer_idx], k), (self._values[layer_idx], v)]
        batch = len(step.starts)
        uniform = len(set(step.starts)) == 1 and all(n == step.width for n in step.counts)
        for store, new in pairs:
            if uniform:  # one copy for the whole batch: the usual decode or prefill step
                start = step.starts[0]
                store[:batch, start : start + step.width].copy_(new)
                continue
            for i, (start, count) in enumerate(zip(step.starts, step.counts, strict=True)):
                store[i, start : start + count].copy_(new[i, :count])

    def _update_static(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        batch, width = int(k.shape[0]), int(k.shape[1])
        if positions.dtype not in (torch.int32, torch.int64) or tuple(positions.shape) != (batch,):
            raise ConfigurationError(
                f"expected positions as an int32/int64 tensor of shape [{batch}] (one start per sequence), got "
                f"{format_shape(positions.shape)} {dtype_name(positions.dtype)}"
            )
        if positions.device != c.device:
            raise ConfigurationError(f"expected positions on {c.device} (the cache's device), got {positions.device}")
        if self._step is not None:
            raise ConfigurationError("a host-positioned step is in progress; finish it before a graph-safe step")
        if c.device.type == "cpu":  # checking costs no synchronisation here
            lo, hi = int(positions.min()), int(positions.max())
            if lo < 0:
                raise ConfigurationError(f"expected positions >= 0, got {lo}")
            if hi + width > c.max_seq_length:
                raise CapacityError(
                    f"a sequence would hold {hi + width} tokens (position {hi} + {width} new) but the cache holds "
                    f"max_seq_length={c.max_seq_length}"
                )
        if any(self._clean[i] < c.max_seq_length for i in range(batch)):
            if c.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise ConfigurationError(
                    "the cache's storage is not initialised for the graph-safe path; call prepare_static() "
                    "before capturing"
                )
            self.prepare_static(batch)
        cols = positions.unsqueeze(1).long() + torch.arange(width, device=c.device)
        if c.device.type != "cpu":
            # On a GPU, checking would need the host synchronisation this path exists to avoid: out-of-range
            # positions fail in the indexing kernel (a device-side assertion). A negative column would be taken
            # from the end of the row instead, a silent wrong write, so it is made out of range too.
            cols = cols.masked_fill(cols < 0, c.max_seq_length)
        rows = self._rows[:batch]
        if self._key_scales is not None and self._value_scales is not None:
            kq, ks = quantize_kv(k, c.kv_dtype)
            vq, vs = quantize_kv(v, c.kv_dtype)
            self._keys[layer_idx].index_put_((rows, cols), kq)
            self._values[layer_idx].index_put_((rows, cols), vq)
            self._key_scales[layer_idx].index_put_((rows, cols), ks)
            self._value_scales[layer_idx].index_put_((rows, cols), vs)
        else:
            self._keys[layer_idx].index_put_((rows, cols), k)
            self._values[layer_idx].index_put_((rows, cols), v)
        return self._read(layer_idx, batch, c.max_seq_length)


def _ints(values: object, batch: int | None, name: str) -> list[int]:
    """``values`` as a list of ints, one per sequence (``batch`` of them; any number for ``None``)."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or batch not in (None, len(values)):
        count = "one int per sequence" if batch is None else f"one int per sequence ({batch})"
        raise ConfigurationError(f"expected {name} to list {count}, got {values!r}")
    out = []
    for x in values:
        if isinstance(x, bool) or not isinstance(x, int):
            raise ConfigurationError(f"expected {name} to hold ints, got {values!r}")
        out.append(int(x))
    return out
