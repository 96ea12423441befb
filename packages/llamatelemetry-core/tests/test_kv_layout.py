"""The paged KV layout that kvcache writes and flashattn reads."""

from __future__ import annotations

import pytest
import torch

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.kv_layout import PAD_SLOT, PagedKV, PagedKVLayout, slot_for
from llamatelemetry_core.serving import SequenceStep, StepInput


def test_layout_shapes_and_bytes() -> None:
    layout = PagedKVLayout(num_blocks=7, page_size=16, num_kv_heads=3, head_dim=64, dtype=torch.float16)
    assert layout.kv_shape == (7, 16, 3, 64)
    assert not layout.quantized
    assert layout.bytes_per_token() == 2 * 3 * 64 * 2
    assert layout.nbytes() == 7 * 16 * layout.bytes_per_token()
    int8 = PagedKVLayout(7, 16, 3, 64, torch.int8)
    assert int8.quantized and int8.scale_shape == (7, 16, 3)
    assert int8.bytes_per_token() == 2 * 3 * (64 + 4)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_layout_rejects_bad_sizes(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="page_size"):
        PagedKVLayout(4, bad, 2, 8, torch.float16)  # type: ignore[arg-type]


def test_layout_rejects_bad_dtype() -> None:
    with pytest.raises(ConfigurationError, match="int32"):
        PagedKVLayout(4, 16, 2, 8, torch.int32)


def test_paged_kv_validate() -> None:
    k = torch.randn(5, 4, 2, 8)
    store = PagedKV(k, torch.randn(5, 4, 2, 8))
    assert store.validate() == PagedKVLayout(5, 4, 2, 8, torch.float32)
    with pytest.raises(ConfigurationError, match="value_cache"):
        PagedKV(k, torch.randn(5, 4, 2, 9)).validate()
    with pytest.raises(ConfigurationError, match="takes no scales"):
        PagedKV(k, k.clone(), torch.ones(5, 4, 2), torch.ones(5, 4, 2)).validate()
    q = torch.zeros(5, 4, 2, 8, dtype=torch.int8)
    with pytest.raises(ConfigurationError, match="key_scale"):
        PagedKV(q, q.clone()).validate()
    with pytest.raises(ConfigurationError, match="float32"):
        PagedKV(q, q.clone(), torch.ones(5, 4, 2, dtype=torch.float16), torch.ones(5, 4, 2)).validate()
    assert PagedKV(q, q.clone(), torch.ones(5, 4, 2), torch.ones(5, 4, 2)).validate().quantized
    with pytest.raises(ConfigurationError, match="contiguous"):
        PagedKV(k.transpose(0, 1).contiguous().transpose(0, 1), k.clone()).validate()


def test_slots_and_steps() -> None:
    assert slot_for(3, 5, 16) == 53
    assert PAD_SLOT == -1
    step = StepInput(
        (
            SequenceStep(0, (1, 2, 3), start_pos=0, block_table=(4,), want_logits=False),
            SequenceStep(1, (9,), start_pos=20, block_table=(0, 2)),
        )
    )
    assert step.num_tokens == 4 and step.num_logits == 1
    assert step.sequences[1].end_pos == 21
