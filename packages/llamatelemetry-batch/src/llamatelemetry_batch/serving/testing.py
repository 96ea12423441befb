"""Reference pieces for testing schedulers, engines and block managers on a CPU, with no model weights.

* :class:`HashDecoder`: a deterministic toy :class:`~llamatelemetry_core.serving.DecoderModel` whose next token
  is a function of the whole sequence (a chained hash), so the expected greedy output of any prompt is known
  without running anything (:meth:`HashDecoder.expected_greedy`). The hash chain lives in the model's own
  per-sequence state or, paged, in a slot store indexed by the block tables; a step that starts at the wrong
  position, reads a slot nobody wrote, or reads another sequence's K/V changes the output.
* :class:`TinyDecoder`: a small random pre-norm transformer (float64) with a real KV cache, unpaged (a tensor per
  sequence) or paged (``[num_blocks, page_size, heads, head_dim]`` written through the block tables, the layout
  of :mod:`llamatelemetry_core.kv_layout`), and a cache-free reference forward as its oracle.
* :class:`PrefixCachingBlockManager`: a minimal :class:`~llamatelemetry_core.serving.KVBlockManager` with prefix
  caching that registers a block for reuse as soon as it is allocated, before its K/V is written: the hardest
  case for a scheduler with chunked prefill and preemption.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch

from llamatelemetry_core.errors import CapacityError, ConfigurationError
from llamatelemetry_core.serving import SequenceStep, StepInput, check_decode_step, check_token_ids

__all__ = ["HashDecoder", "PrefixCachingBlockManager", "TinyDecoder"]

_MODULUS = (1 << 61) - 1


def _chain(previous: int, token: int) -> int:
    return (previous * 1_000_003 + token + 1) % _MODULUS


class HashDecoder:
    """Next token = chained hash of the sequence mod ``vocab_size``; one-hot logits, or random ones when sampled.

    Args:
        vocab_size: size of the logits.
        max_model_len: longest sequence.
        page_size: ``None`` for per-sequence state; else the model is paged over ``num_blocks`` blocks.
        num_blocks: blocks of the paged slot store.
        one_hot: ``True``: logits are one-hot at the hash token (greedy decoding follows the hash); ``False``:
            logits are a random normal row seeded by the hash (a non-trivial distribution to sample from; its
            arg-max is forced to the hash token, so greedy decoding still follows the hash).
        device: where the logits are returned (the bookkeeping stays in Python).
        token_feed: accept tokens fed from the device (``accepts_token_feed``; read back on the host), so that
            an engine with ``overlap=True`` can drive it.
    """

    def __init__(
        self,
        vocab_size: int = 97,
        max_model_len: int = 512,
        *,
        page_size: int | None = None,
        num_blocks: int = 0,
        one_hot: bool = True,
        device: str | torch.device = "cpu",
        token_feed: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.accepts_token_feed = token_feed
        self._vocab_size = vocab_size
        self._max_model_len = max_model_len
        self._page_size = page_size
        self.one_hot = one_hot
        self._state: dict[int, list[int]] = {}
        self._slots: list[int | None] = [None] * (num_blocks * (page_size or 0))
        self.steps: list[StepInput] = []
        self.record_steps = False

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def page_size(self) -> int | None:
        return self._page_size

    @property
    def num_live_sequences(self) -> int:
        """Sequences holding per-sequence state (unpaged only; 0 once everything is released)."""
        return len(self._state)

    def expected_greedy(
        self, prompt: Sequence[int], max_new_tokens: int, stop_token_ids: Sequence[int] = ()
    ) -> list[int]:
        """The greedy continuation of ``prompt``, computed without any cache."""
        h, tokens = 0, list(prompt)
        for token in tokens:
            h = _chain(h, token)
        out: list[int] = []
        while len(out) < max_new_tokens and len(tokens) < self._max_model_len:
            token = h % self._vocab_size
            out.append(token)
            tokens.append(token)
            h = _chain(h, token)
            if token in stop_token_ids:
                break
        return out

    def step(self, batch: StepInput) -> torch.Tensor:
        batch = batch.read_feed()
        if self.record_steps:
            self.steps.append(batch)
        rows: list[torch.Tensor] = []
        for seq in batch.sequences:
            h = self._run(seq)
            if seq.want_logits:
                rows.append(self._logits(h))
        logits = torch.stack(rows) if rows else torch.empty(0, self._vocab_size)
        return logits.to(self.device)

    def release(self, seq_id: int) -> None:
        self._state.pop(seq_id, None)

    def _run(self, seq: SequenceStep) -> int:
        if seq.end_pos > self._max_model_len:
            raise AssertionError(f"sequence {seq.seq_id} runs past max_model_len: {seq.end_pos}")
        if self._page_size is None:
            state = self._state.setdefault(seq.seq_id, [])
            if seq.start_pos != len(state):
                raise AssertionError(f"sequence {seq.seq_id} starts at {seq.start_pos}, the model holds {len(state)}")
            h = state[-1] if state else 0
            for token in seq.token_ids:
                h = _chain(h, token)
                state.append(h)
            return h
        page = self._page_size
        if len(seq.block_table) * page < seq.end_pos:
            raise AssertionError(f"block table of sequence {seq.seq_id} too short for {seq.end_pos} tokens")

        def slot(position: int) -> int:
            return seq.block_table[position // page] * page + position % page

        h = 0
        if seq.start_pos > 0:
            stored = self._slots[slot(seq.start_pos - 1)]
            if stored is None:
                raise AssertionError(f"sequence {seq.seq_id} reads slot of position {seq.start_pos - 1}, never written")
            h = stored
        for offset, token in enumerate(seq.token_ids):
            h = _chain(h, token)
            self._slots[slot(seq.start_pos + offset)] = h
        return h

    def _logits(self, h: int) -> torch.Tensor:
        target = h % self._vocab_size
        if self.one_hot:
            row = torch.zeros(self._vocab_size)
            row[target] = 1.0
            return row
        row = torch.randn(self._vocab_size, generator=torch.Generator().manual_seed(h % (1 << 62)))
        row[target] = row.max() + 1.0
        return row


class TinyDecoder:
    """A random pre-norm transformer decoder (float64) with a KV cache, for engine tests on CPU.

    Unpaged (``page_size=None``): K/V of each sequence in its own tensors, keyed by ``seq_id``. Paged: K/V in
    ``[num_blocks, page_size, num_heads, head_dim]`` tensors per layer, written and read through the block
    tables (slot ``block_table[t // page_size] * page_size + t % page_size``). Weights and caches live on
    ``device``. ``token_feed=True``: accepts tokens fed from the device (read back on the host).
    """

    def __init__(
        self,
        vocab_size: int = 61,
        max_model_len: int = 256,
        *,
        width: int = 32,
        num_heads: int = 2,
        num_layers: int = 2,
        page_size: int | None = None,
        num_blocks: int = 0,
        seed: int = 0,
        device: str | torch.device = "cpu",
        token_feed: bool = False,
    ) -> None:
        self.accepts_token_feed = token_feed
        g = torch.Generator().manual_seed(seed)
        dtype = torch.float64
        self.device = device = torch.device(device)
        self._vocab_size, self._max_model_len, self._page_size = vocab_size, max_model_len, page_size
        self.num_heads, self.head_dim = num_heads, width // num_heads

        def weight(*shape: int) -> torch.Tensor:
            return (torch.randn(*shape, generator=g, dtype=dtype) / math.sqrt(shape[0])).to(device)

        self.embed = torch.randn(vocab_size, width, generator=g, dtype=dtype).to(device)
        self.positions = (torch.randn(max_model_len, width, generator=g, dtype=dtype) * 0.3).to(device)
        self.layers = [
            {
                "qkv": weight(width, 3 * width),
                "out": weight(width, width),
                "up": weight(width, 2 * width),
                "down": weight(width, width),
            }
            for _ in range(num_layers)
        ]
        self.unembed = weight(width, vocab_size)
        self._kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        shape = (num_blocks, page_size or 1, num_heads, self.head_dim)
        self.key_cache = (
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)] if page_size else []
        )
        self.value_cache = (
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)] if page_size else []
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def page_size(self) -> int | None:
        return self._page_size

    @property
    def num_live_sequences(self) -> int:
        """Sequences holding per-sequence K/V (unpaged only)."""
        return len(self._kv)

    def release(self, seq_id: int) -> None:
        self._kv.pop(seq_id, None)

    @torch.inference_mode()
    def step(self, batch: StepInput) -> torch.Tensor:
        batch = batch.read_feed()
        rows = [self._forward(seq) for seq in batch.sequences]
        wanted = [row[-1] for row, seq in zip(rows, batch.sequences, strict=True) if seq.want_logits]
        if not wanted:
            return torch.empty(0, self._vocab_size, dtype=torch.float64, device=self.device)
        return torch.stack(wanted) @ self.unembed

    @torch.inference_mode()
    def reference_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits after every token of ``token_ids``, computed from scratch (no cache): ``[len, vocab]``."""
        x = self.embed[list(token_ids)] + self.positions[: len(token_ids)]
        for layer in self.layers:
            q, k, v = self._qkv(layer, x)
            x = self._block(layer, x, q, k, v, start=0)
        return _rms(x) @ self.unembed

    def _forward(self, seq: SequenceStep) -> torch.Tensor:
        start, end = seq.start_pos, seq.end_pos
        x = self.embed[list(seq.token_ids)] + self.positions[start:end]
        if self._page_size is None:
            cache = self._kv.setdefault(seq.seq_id, [])
        else:
            page = self._page_size
            positions = torch.arange(end, device=self.device)
            table = torch.tensor(seq.block_table, dtype=torch.long, device=self.device)
            slots = table[positions // page] * page + positions % page
        for index, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x)
            if self._page_size is None:
                if index == len(cache):
                    cache.append((k[:0], v[:0]))
                keys, values = cache[index]
                if keys.shape[0] != start:
                    raise AssertionError(f"sequence {seq.seq_id} starts at {start}, its cache holds {keys.shape[0]}")
                keys, values = torch.cat([keys, k]), torch.cat([values, v])
                cache[index] = (keys, values)
            else:
                key_cache = self.key_cache[index].view(-1, self.num_heads, self.head_dim)
                value_cache = self.value_cache[index].view(-1, self.num_heads, self.head_dim)
                key_cache[slots[start:]] = k
                value_cache[slots[start:]] = v
                keys, values = key_cache[slots], value_cache[slots]
            x = self._block(layer, x, q, keys, values, start=start)
        return _rms(x)

    def _qkv(self, layer: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = (_rms(x) @ layer["qkv"]).chunk(3, dim=-1)
        shape = (x.shape[0], self.num_heads, self.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _block(
        self,
        layer: dict[str, torch.Tensor],
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        start: int,
    ) -> torch.Tensor:
        n, total = q.shape[0], k.shape[0]
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(self.head_dim)
        keys_at = torch.arange(total, device=x.device)
        causal = keys_at.unsqueeze(0) > (torch.arange(n, device=x.device) + start).unsqueeze(1)
        attention = torch.einsum("hqk,khd->qhd", scores.masked_fill(causal, float("-inf")).softmax(-1), v)
        x = x + attention.reshape(n, -1) @ layer["out"]
        gate, up = (_rms(x) @ layer["up"]).chunk(2, dim=-1)
        return x + (torch.nn.functional.silu(gate) * up) @ layer["down"]


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class PrefixCachingBlockManager:
    """Paged blocks with reference counts and reuse of full blocks by a chained hash of their tokens.

    A block's hash is registered when the block is handed out for full tokens (at ``allocate``, or when
    ``append`` fills it), before anyone has written its K/V, as nano-vllm does. Unreferenced blocks stay cached
    and are evicted least recently freed first.
    """

    def __init__(self, num_blocks: int, page_size: int) -> None:
        self._num_blocks, self._page_size = num_blocks, page_size
        self._refs = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._tables: dict[int, list[int]] = {}
        self._tokens: dict[int, list[int]] = {}
        self._chain_end: dict[int, int] = {}  # hash of the sequence's last full block

    @property
    def page_size(self) -> int:
        return self._page_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def _hashes(self, token_ids: Sequence[int]) -> list[int]:
        hashes, h, page = [], 0, self._page_size
        for start in range(0, len(token_ids) - page + 1, page):
            for token in token_ids[start : start + page]:
                h = _chain(h, token)
            hashes.append(h)
        return hashes

    def _matched(self, token_ids: Sequence[int]) -> list[int]:
        matched = []
        for h in self._hashes(token_ids):
            block = self._by_hash.get(h)
            if block is None:
                break
            matched.append(block)
        return matched

    def can_allocate(self, token_ids: Sequence[int]) -> bool:
        check_token_ids(token_ids)
        if not token_ids:
            return False
        matched = self._matched(token_ids)
        fresh = -(-len(token_ids) // self._page_size) - len(matched)
        return fresh + sum(1 for b in matched if b in self._free) <= len(self._free)

    def allocate(self, seq_id: int, token_ids: Sequence[int]) -> int:
        if seq_id in self._tables:
            raise ConfigurationError(f"sequence {seq_id} already holds blocks; free it first (seq_id)")
        if not token_ids:
            raise ConfigurationError(f"sequence {seq_id}: expected at least one token to allocate (token_ids)")
        if not self.can_allocate(token_ids):
            raise CapacityError(f"no room for {len(token_ids)} tokens ({len(self._free)} free blocks)")
        matched = self._matched(token_ids)
        for block in matched:
            self._free.pop(block, None)
            self._refs[block] += 1
        table = list(matched)
        hashes = self._hashes(token_ids)
        while len(table) * self._page_size < len(token_ids):
            block = self._take()
            if len(table) < len(hashes):
                self._register(block, hashes[len(table)])
            table.append(block)
        self._tables[seq_id], self._tokens[seq_id] = table, list(token_ids)
        self._chain_end[seq_id] = hashes[-1] if hashes else 0
        return min(len(matched) * self._page_size, (len(token_ids) - 1) // self._page_size * self._page_size)

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        tokens = self._tokens[seq_id]
        if type(num_tokens) is not int or num_tokens < 0:
            raise ConfigurationError(f"expected num_tokens to be an int >= 0, got {num_tokens!r}")
        needed = -(-(len(tokens) + num_tokens) // self._page_size) - len(self._tables[seq_id])
        return needed <= len(self._free)

    def append(self, seq_id: int, token_ids: Sequence[int]) -> None:
        check_token_ids(token_ids)
        if not self.can_append(seq_id, len(token_ids)):
            raise CapacityError(f"no room for {len(token_ids)} more tokens of sequence {seq_id}")
        tokens, table = self._tokens[seq_id], self._tables[seq_id]
        for token in token_ids:
            if len(tokens) == len(table) * self._page_size:
                table.append(self._take())
            tokens.append(token)
            if len(tokens) % self._page_size == 0:
                h = self._chain_end[seq_id]
                for full in tokens[-self._page_size :]:
                    h = _chain(h, full)
                self._chain_end[seq_id] = h
                self._register(table[-1], h)

    def append_decode(self, seq_ids: Sequence[int], token_ids: Sequence[int]) -> None:
        check_decode_step(seq_ids, token_ids)
        page = self._page_size
        needed = sum(1 for seq_id in seq_ids if len(self._tokens[seq_id]) == len(self._tables[seq_id]) * page)
        if needed > len(self._free):
            raise CapacityError(f"no room for one more token of each of {len(seq_ids)} sequences")
        for seq_id, token in zip(seq_ids, token_ids, strict=True):
            self.append(seq_id, [token])

    def free(self, seq_id: int) -> None:
        table = self._tables.pop(seq_id)
        del self._tokens[seq_id], self._chain_end[seq_id]
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None

    def block_table(self, seq_id: int) -> list[int]:
        return list(self._tables[seq_id])

    def num_tokens(self, seq_id: int) -> int:
        return len(self._tokens[seq_id])

    def _take(self) -> int:
        block, _ = self._free.popitem(last=False)
        old = self._hash_of[block]
        if old is not None and self._by_hash.get(old) == block:
            del self._by_hash[old]
        self._hash_of[block] = None
        self._refs[block] = 1
        return block

    def _register(self, block: int, h: int) -> None:
        self._hash_of[block] = h
        self._by_hash.setdefault(h, block)
