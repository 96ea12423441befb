"""BatchBucketedGraphs: default sizes, nearest bucket, padding and slicing against eager, eager above the max."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamatelemetry_core.errors import ConfigurationError
from llamatelemetry_core.testing import assert_close
from llamatelemetry_graphs import BatchBucketedGraphs, GraphCaptureConfig, default_batch_buckets
from llamatelemetry_graphs.errors import GraphInputError, GraphStateError

# The eager emulation, also on a GPU machine (CPU tensors there would otherwise be refused).
pytestmark = pytest.mark.usefixtures("eager_emulation")

WIDTH, VOCAB = 12, 37


class TinyDecoder(torch.nn.Module):
    """A decode step with row-independent batch: token ids [B] and hidden [B, W] in, logits [B, V] out.

    ``table`` is a non-batched input (like a rotary table or a KV cache) that every graph reads in place.
    """

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.proj = torch.nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(tokens) + hidden) * table
        logits: torch.Tensor = self.proj(h)
        return logits


def _decoder_buckets(rng: torch.Generator, **kwargs: object) -> tuple[TinyDecoder, BatchBucketedGraphs, torch.Tensor]:
    model = TinyDecoder().eval()
    table = torch.randn(WIDTH, generator=rng)
    tokens = torch.randint(0, VOCAB, (3,), generator=rng)
    hidden = torch.randn(3, WIDTH, generator=rng)
    buckets = BatchBucketedGraphs(
        model,
        (tokens, hidden, table),
        batch_dims=(0, 0, None),
        config=GraphCaptureConfig(warmup_iters=1),
        **kwargs,  # type: ignore[arg-type]
    )
    return model, buckets, table


def test_default_batch_buckets_follow_vllm() -> None:
    assert default_batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert default_batch_buckets(8) == [1, 2, 4, 8]
    assert default_batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert default_batch_buckets(1) == [1]
    assert default_batch_buckets(3) == [1, 2, 3]
    with pytest.raises(ConfigurationError, match="expected max_batch_size to be a positive integer, got 0"):
        default_batch_buckets(0)


@given(st.integers(min_value=1, max_value=600))
def test_default_batch_buckets_cover_every_size(max_batch_size: int) -> None:
    sizes = default_batch_buckets(max_batch_size)
    assert sizes == sorted(set(sizes))
    assert sizes[0] == 1 and sizes[-1] == max_batch_size
    assert all(s in (1, 2, 4) or s % 8 == 0 or s == max_batch_size for s in sizes)
    assert all(b - a <= 8 for a, b in itertools.pairwise(sizes))  # padding never wastes 8+ rows


@given(
    sizes=st.lists(st.integers(min_value=1, max_value=200), min_size=1, max_size=12),
    batch=st.integers(min_value=1, max_value=250),
)
def test_bucket_for_is_the_smallest_size_that_fits(sizes: list[int], batch: int) -> None:
    buckets = BatchBucketedGraphs(torch.neg, (torch.zeros(1, 2),), batch_sizes=sizes)
    bucket = buckets.bucket_for(batch)
    fitting = [s for s in sizes if s >= batch]
    assert bucket == (min(fitting) if fitting else None)
    assert buckets.batch_sizes == sorted(set(sizes))


def test_capture_is_largest_first_and_every_size_matches_eager(rng: torch.Generator) -> None:
    model, buckets, table = _decoder_buckets(rng, max_batch_size=13)
    assert buckets.capture() is buckets
    assert buckets.pool.list_graphs() == ["batch_13", "batch_8", "batch_4", "batch_2", "batch_1"]
    assert buckets.is_captured and not buckets.is_cuda_graph
    with torch.no_grad():
        for batch in range(1, 14):
            tokens = torch.randint(0, VOCAB, (batch,), generator=rng)
            hidden = torch.randn(batch, WIDTH, generator=rng)
            got = buckets(tokens, hidden, table)
            assert got.shape == (batch, VOCAB)
            assert_close(got, model(tokens, hidden, table), name=f"logits at batch {batch}")
    assert buckets.replays == 13 and buckets.eager_calls == 0


def test_eager_above_the_largest_size(rng: torch.Generator) -> None:
    model, buckets, table = _decoder_buckets(rng, batch_sizes=[4, 2])
    buckets.capture()
    tokens = torch.randint(0, VOCAB, (5,), generator=rng)
    hidden = torch.randn(5, WIDTH, generator=rng)
    with torch.no_grad():
        assert_close(buckets(tokens, hidden, table), model(tokens, hidden, table))
    assert buckets.eager_calls == 1 and buckets.replays == 0


def test_a_new_non_batched_tensor_is_copied_into_the_static_one(rng: torch.Generator) -> None:
    model, buckets, table = _decoder_buckets(rng, max_batch_size=4)
    buckets.capture()
    new_table = torch.randn(WIDTH, generator=rng)
    tokens = torch.randint(0, VOCAB, (3,), generator=rng)
    hidden = torch.randn(3, WIDTH, generator=rng)
    with torch.no_grad():
        assert_close(buckets(tokens, hidden, new_table), model(tokens, hidden, new_table))
    assert_close(table, new_table, name="static table")


@pytest.mark.parametrize("pad", [0, -1, 5])
def test_padding_rows_hold_the_pad_value_and_are_sliced_off(pad: int, rng: torch.Generator) -> None:
    ids = torch.randint(0, 9, (2, 3), generator=rng)
    full = BatchBucketedGraphs(lambda t: t * 1, (ids,), batch_sizes=[8], pad_values=pad, output_batch_dim=None)
    full.capture()
    got = full(ids[:1])
    assert got.shape == (8, 3)
    assert torch.equal(got[:1], ids[:1]) and bool((got[1:] == pad).all())
    sliced = BatchBucketedGraphs(lambda t: t * 1, (ids,), batch_sizes=[8], pad_values=pad).capture()
    assert torch.equal(sliced(ids), ids)


def test_batch_dimension_other_than_zero(rng: torch.Generator) -> None:
    # Inputs [H, B, D]: the batch is dim 1; outputs keep it at dim 1.
    x = torch.randn(3, 2, 5, generator=rng)
    scale = torch.randn(5, generator=rng)
    buckets = BatchBucketedGraphs(
        lambda t, s: t.softmax(-1) * s, (x, scale), batch_dims=(1, None), max_batch_size=6, output_batch_dim=1
    ).capture()
    for batch in (1, 3, 5, 6):
        new = torch.randn(3, batch, 5, generator=rng)
        assert_close(buckets(new, scale), new.softmax(-1) * scale)


def test_outputs_are_views_unless_copied(rng: torch.Generator) -> None:
    x = torch.randn(4, 3, generator=rng)
    buckets = BatchBucketedGraphs(torch.exp, (x,), batch_sizes=[4]).capture()
    first = buckets(torch.randn(3, 3, generator=rng))
    kept = buckets(x[:3], copy=True)
    second = buckets(torch.randn(3, 3, generator=rng))
    assert first.data_ptr() == second.data_ptr() != kept.data_ptr()
    assert_close(kept, torch.exp(x[:3]))


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=9), min_size=1, max_size=4, unique=True),
    batch=st.integers(min_value=1, max_value=12),
    width=st.integers(min_value=1, max_value=7),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_padded_replay_equals_eager_for_any_sizes(sizes: list[int], batch: int, width: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(width, width + 2, generator=generator)

    def step(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        y = x @ w
        return y.tanh(), {"sum": y.sum(-1), "first": x[:, :1]}

    example = torch.randn(1, width, generator=generator)
    buckets = BatchBucketedGraphs(
        step, (example, weight), batch_dims=(0, None), batch_sizes=sizes, config=GraphCaptureConfig(warmup_iters=0)
    ).capture()
    x = torch.randn(batch, width, generator=generator)
    got, parts = buckets(x, weight)
    want, want_parts = step(x, weight)
    assert_close(got, want)
    assert_close(parts["sum"], want_parts["sum"])
    assert_close(parts["first"], want_parts["first"])
    assert buckets.eager_calls == (1 if batch > max(sizes) else 0)


# --- errors ------------------------------------------------------------------------------------------------------


def test_call_before_capture_and_capture_twice(rng: torch.Generator) -> None:
    buckets = BatchBucketedGraphs(torch.neg, (torch.randn(2, 3, generator=rng),), max_batch_size=2)
    with pytest.raises(GraphStateError, match=r"call capture\(\) before"):
        buckets(torch.zeros(1, 3))
    buckets.capture()
    with pytest.raises(GraphStateError, match="already captured"):
        buckets.capture()


def test_input_mismatches_name_expected_and_got(rng: torch.Generator) -> None:
    _, buckets, table = _decoder_buckets(rng, max_batch_size=4)
    buckets.capture()
    tokens = torch.randint(0, VOCAB, (2,), generator=rng)
    hidden = torch.randn(2, WIDTH, generator=rng)
    with pytest.raises(GraphInputError, match=r"expected 3 inputs \(as in example_inputs\), got 2"):
        buckets(tokens, hidden)
    with pytest.raises(GraphInputError, match=r"expected input 1 of shape \[B, 12\] \(any batch size\).*got \[2, 11\]"):
        buckets(tokens, hidden[:, :11], table)
    with pytest.raises(GraphInputError, match=r"expected input 1 .*float32.*got \[2, 12\] float64"):
        buckets(tokens, hidden.double(), table)
    with pytest.raises(GraphInputError, match=r"expected input 2 of shape \[12\] \(not batched\).*got \[13\]"):
        buckets(tokens, hidden, torch.zeros(13))
    with pytest.raises(GraphInputError, match=r"same batch size, got 3 and 2"):
        buckets(torch.randint(0, VOCAB, (3,), generator=rng), hidden, table)
    with pytest.raises(GraphInputError, match=r"batch size >= 1, got 0"):
        buckets(tokens[:0], hidden[:0], table)
    with pytest.raises(TypeError, match=r"expected input 0 to be a torch\.Tensor, got list"):
        buckets([1, 2], hidden, table)  # type: ignore[arg-type]


def test_outputs_without_the_batch_dimension_are_refused(rng: torch.Generator) -> None:
    x = torch.randn(2, 3, generator=rng)
    buckets = BatchBucketedGraphs(lambda t: t.sum(), (x,), max_batch_size=4)
    with pytest.raises(ConfigurationError, match=r"output tensor 0 to have the batch size 4 at dim 0.*got shape \[\]"):
        buckets.capture()
    assert not buckets.is_captured and buckets.pool.list_graphs() == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"expected max_batch_size or batch_sizes, got neither"),
        ({"batch_sizes": [1, 4], "max_batch_size": 8}, r"largest of batch_sizes \(4\), got 8"),
        ({"batch_sizes": []}, r"at least one batch size"),
        ({"batch_sizes": [0, 2]}, r"each batch size to be a positive integer, got 0"),
        ({"batch_sizes": 4}, r"batch_sizes to be a list of positive ints"),
        ({"max_batch_size": 4, "batch_dims": 2}, r"batch_dims\[0\] to be None or a dimension .*\[2, 3\].*got 2"),
        ({"max_batch_size": 4, "batch_dims": None}, r"at least one batched input"),
        ({"max_batch_size": 4, "batch_dims": (0, 0)}, r"batch_dims to have one entry per input \(1\), got 2"),
        ({"max_batch_size": 4, "pad_values": "x"}, r"pad_values\[0\] to be a number"),
        ({"max_batch_size": 4, "output_batch_dim": 0.5}, r"output_batch_dim to be an int or None"),
    ],
)
def test_invalid_construction(kwargs: dict[str, object], message: str, rng: torch.Generator) -> None:
    with pytest.raises(ConfigurationError, match=message):
        BatchBucketedGraphs(torch.neg, (torch.randn(2, 3, generator=rng),), **kwargs)  # type: ignore[arg-type]


def test_invalid_examples() -> None:
    with pytest.raises(TypeError, match=r"example_inputs to be a tuple or list of tensors, got a single tensor"):
        BatchBucketedGraphs(torch.neg, torch.zeros(2), max_batch_size=2)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="at least one example input"):
        BatchBucketedGraphs(torch.neg, (), max_batch_size=2)
    with pytest.raises(TypeError, match="expected fn to be callable"):
        BatchBucketedGraphs(None, (torch.zeros(1),), max_batch_size=2)  # type: ignore[arg-type]


def test_outputs_are_held_once_for_every_size(rng: torch.Generator) -> None:
    x = torch.randn(2, 4, generator=rng)
    shared = BatchBucketedGraphs(torch.exp, (x,), batch_sizes=[1, 2, 4]).capture()
    assert shared.memory_usage().reserved_bytes == 4 * 4 * 4  # the largest bucket's output, viewed by all
    small = shared(x[:1])
    large = shared(torch.randn(4, 4, generator=rng))
    assert small.data_ptr() == large.data_ptr()
    separate = BatchBucketedGraphs(torch.exp, (x,), batch_sizes=[1, 2, 4], output_batch_dim=None).capture()
    assert separate.memory_usage().reserved_bytes == (1 + 2 + 4) * 4 * 4
    assert separate.max_batch_size == 4


def test_outputs_that_change_structure_with_the_batch_are_refused(rng: torch.Generator) -> None:
    def odd(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (t, t) if t.shape[0] == 4 else (t,)

    with pytest.raises(ConfigurationError, match=r"expected fn to return 2 tensors at every batch size .*got 1"):
        BatchBucketedGraphs(odd, (torch.randn(4, 3, generator=rng),), batch_sizes=[2, 4]).capture()

    def wider(t: torch.Tensor) -> torch.Tensor:
        return t.repeat(1, 2) if t.shape[0] == 4 else t

    buckets = BatchBucketedGraphs(wider, (torch.randn(4, 3, generator=rng),), batch_sizes=[2, 4])
    with pytest.raises(
        ConfigurationError, match=r"output tensor 0 at batch size 2 to be \[2, 6\] float32.*got \[2, 3\]"
    ):
        buckets.capture()
    assert not buckets.is_captured
