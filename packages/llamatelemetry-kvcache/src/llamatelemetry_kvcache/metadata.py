"""Per-step metadata of a paged cache as tensors: block tables, sequence lengths, slot mappings.

Built once per step on the host from any :class:`~llamatelemetry_core.serving.KVBlockManager` and shared by every
layer, in the layout of :mod:`llamatelemetry_core.kv_layout`: ``block_tables`` int32 ``[batch,
max_blocks_per_seq]`` padded with ``PAD_BLOCK``, ``seq_lens`` int32 ``[batch]``, ``slot_mapping`` int64
``[num_tokens]`` with ``PAD_SLOT`` for padded tokens.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import cast

import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.kv_layout import PAD_BLOCK, PAD_SLOT
from llamatelemetry_core.serving import KVBlockManager
from llamatelemetry_core.validation import check_non_negative_int

__all__ = ["BlockTableBuilder", "block_tables_tensor", "slot_mapping", "slot_mapping_tensor"]


def block_tables_tensor(
    manager: KVBlockManager,
    seq_ids: Sequence[int],
    *,
    device: torch.device | str | None = None,
    max_blocks_per_seq: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_tables, seq_lens)`` of ``seq_ids``, in that order, on ``device`` (default CPU).

    ``max_blocks_per_seq`` fixes the table width (a CUDA graph needs fixed shapes); by default it is the longest
    table. Raises ``ConfigurationError`` when a table is wider than ``max_blocks_per_seq``.
    """
    _check_ids(seq_ids)
    if max_blocks_per_seq is not None:
        check_non_negative_int(max_blocks_per_seq, "max_blocks_per_seq")
    tables = [manager.block_table(s) for s in seq_ids]
    lengths = [manager.num_tokens(s) for s in seq_ids]
    width = max((len(t) for t in tables), default=0) if max_blocks_per_seq is None else max_blocks_per_seq
    flat: list[int] = []
    for seq_id, table in zip(seq_ids, tables, strict=True):
        if len(table) > width:
            raise ConfigurationError(
                f"sequence {seq_id} holds {len(table)} blocks, more than max_blocks_per_seq={width}; raise it"
            )
        flat += table
        flat += [PAD_BLOCK] * (width - len(table))
    block_tables = _int32_tensor(flat).reshape(len(tables), width)
    seq_lens = _int32_tensor(lengths)
    if device is not None:
        block_tables = block_tables.to(device, non_blocking=True)
        seq_lens = seq_lens.to(device, non_blocking=True)
    return block_tables, seq_lens


class BlockTableBuilder:
    """Builds ``block_tables`` step after step, copying only the blocks added since the previous step.

    A scheduler step changes a few entries of a table of ``batch x blocks`` (one new block per sequence every
    ``page_size`` tokens), so rebuilding it from Python lists each step costs milliseconds for a large batch. The
    builder keeps one row per sequence in a flat C array of width ``max_blocks_per_seq``, appends new blocks to
    the rows, and answers with one ``index_select`` over a tensor that views the array. It reads
    ``manager.block_table_view(seq_id)`` (the block list itself, which only grows while the sequence lives) when
    the manager has it, else copies ``block_table(seq_id)``. Rows are recycled when ``max_rows`` sequences are
    held: the next call starts over.
    """

    def __init__(self, manager: KVBlockManager, max_blocks_per_seq: int, max_rows: int = 1024) -> None:
        self.manager = manager
        self.width = max_blocks_per_seq
        self.max_rows = max_rows
        self._buffer = bytearray(4 * max_rows * max_blocks_per_seq)
        self._flat = memoryview(self._buffer).cast("i")
        self._tensor = torch.frombuffer(self._buffer, dtype=torch.int32).view(max_rows, max_blocks_per_seq)
        self._rows: dict[int, tuple[int, Sequence[int], int]] = {}  # seq id -> (row, block list, blocks copied)
        self._free_rows = list(range(max_rows - 1, -1, -1))
        self._view = getattr(manager, "block_table_view", None)

    def build(
        self, seq_ids: Sequence[int], *, device: torch.device | str | None = None, width: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block_tables, seq_lens)`` of ``seq_ids``, int32, ``[batch, width]`` (default: the longest table)."""
        _check_ids(seq_ids)
        if len(seq_ids) > self.max_rows:
            raise ConfigurationError(f"got {len(seq_ids)} sequences, more than max_rows={self.max_rows}")
        if len(self._free_rows) < len(seq_ids):  # rows of finished sequences are only reclaimed here
            self._rows.clear()
            self._free_rows = list(range(self.max_rows - 1, -1, -1))
        rows, lengths, widest = [], [], 0
        flat, cols = self._flat, self.width
        for seq_id in seq_ids:
            blocks = self._view(seq_id) if self._view is not None else self.manager.block_table(seq_id)
            entry = self._rows.get(seq_id)
            if entry is None:
                row, copied = self._free_rows.pop(), 0
            elif entry[1] is not blocks:  # the id was freed and allocated again (or the manager copies)
                row, copied = entry[0], 0
            else:
                row, _, copied = entry
            n = len(blocks)
            if n > cols:
                raise ConfigurationError(
                    f"sequence {seq_id} holds {n} blocks, more than max_blocks_per_seq={cols}; raise it"
                )
            if n > copied:
                start = row * cols
                flat[start + copied : start + n] = array("i", blocks[copied:])
                flat[start + n : start + cols] = array("i", [PAD_BLOCK]) * (cols - n)
            self._rows[seq_id] = (row, blocks, n)
            rows.append(row)
            lengths.append(self.manager.num_tokens(seq_id))
            widest = max(widest, n)
        used = widest if width is None else width
        if used < widest:
            raise ConfigurationError(
                f"a table of {widest} blocks does not fit width={used} (max_blocks_per_seq); raise it"
            )
        index = _int32_tensor(rows).long()
        block_tables = self._tensor.index_select(0, index)[:, :used].contiguous()
        seq_lens = _int32_tensor(lengths)
        if device is not None:
            block_tables = block_tables.to(device, non_blocking=True)
            seq_lens = seq_lens.to(device, non_blocking=True)
        return block_tables, seq_lens


def _check_ids(seq_ids: object) -> None:
    if isinstance(seq_ids, str | bytes) or not isinstance(seq_ids, Sequence):
        raise ConfigurationError(f"expected seq_ids to be a sequence of sequence ids, got {type(seq_ids).__name__}")


def _int32_tensor(values: list[int]) -> torch.Tensor:
    """A CPU int32 tensor of ``values``: through a C array, ~3x faster than ``torch.tensor`` of a long list."""
    if not values:
        return torch.empty(0, dtype=torch.int32)
    return torch.frombuffer(bytearray(array("i", values)), dtype=torch.int32)


def slot_mapping(manager: KVBlockManager, seq_id: int, start: int, end: int) -> list[int]:
    """Slots (``block * page_size + offset``) of tokens ``start .. end - 1`` of a sequence."""
    table, page = manager.block_table(seq_id), manager.page_size
    for name, value in (("start", start), ("end", end)):
        if type(value) is not int:
            raise ConfigurationError(f"sequence {seq_id}: expected {name} to be an int, got {value!r}")
    if not 0 <= start <= end <= len(table) * page:
        raise ConfigurationError(
            f"sequence {seq_id} has blocks for {len(table) * page} tokens; expected 0 <= start <= end <= that, "
            f"got start={start}, end={end}"
        )
    return [table[t // page] * page + t % page for t in range(start, end)]


def slot_mapping_tensor(
    manager: KVBlockManager,
    spans: Sequence[tuple[int, int, int]],
    *,
    pad_to: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """int64 slots of every ``(seq_id, start, end)`` span, in order, padded with ``PAD_SLOT`` to ``pad_to``."""
    given: object = spans  # checked as the object it is: a caller may pass anything
    if isinstance(given, str | bytes) or not isinstance(given, Sequence):
        raise ConfigurationError(f"expected spans to be a sequence of (seq_id, start, end), got {given!r:.60}")
    slots: list[int] = []
    for span in cast("Sequence[object]", given):
        if not isinstance(span, tuple | list) or len(span) != 3:
            raise ConfigurationError(f"expected spans to hold (seq_id, start, end) triples, got {span!r:.60}")
        seq_id, start, end = span
        slots.extend(slot_mapping(manager, seq_id, start, end))
    if pad_to is not None:
        check_non_negative_int(pad_to, "pad_to")
        if pad_to < len(slots):
            raise ConfigurationError(f"got {len(slots)} tokens, more than pad_to={pad_to}")
        slots.extend([PAD_SLOT] * (pad_to - len(slots)))
    out = torch.tensor(slots, dtype=torch.int64)
    return out if device is None else out.to(device, non_blocking=True)
