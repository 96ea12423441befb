"""The sampler against a per-row reference, its draws against the distribution, and seeded reproducibility."""

from __future__ import annotations

import secrets

import pytest
import torch

from llamatelemetry_batch.serving import SamplingParams, sample_next_tokens
from llamatelemetry_batch.serving.sampling import _filtered_probs, make_generator
from llamatelemetry_core.errors import ConfigurationError

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture
def rng() -> torch.Generator:
    seed = secrets.randbits(31)
    print(f"rng seed: {seed}")
    return torch.Generator().manual_seed(seed)


def _reference_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p on the renormalized distribution: one row, plain loops."""
    probs = torch.softmax(row.double() / p.temperature, dim=-1)
    order = sorted(range(row.numel()), key=lambda i: (-float(row[i]), i))
    keep = order[: p.top_k] if p.top_k else order
    kept = probs[keep] / probs[keep].sum()
    chosen, mass = [], 0.0
    for index, q in zip(keep, kept.tolist(), strict=True):
        if mass >= p.top_p and p.top_p < 1.0:
            break
        chosen.append(index)
        mass += q
    out = torch.zeros_like(probs)
    out[chosen] = probs[chosen] / probs[chosen].sum()
    return out


@pytest.mark.parametrize("vocab", [1, 7, 50, 257])
def test_filtered_probabilities_match_the_reference(vocab: int, rng: torch.Generator) -> None:
    rows = 6
    logits = torch.randn(rows, vocab, generator=rng) * 3
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.5, top_k=5, top_p=0.5),
        SamplingParams(temperature=2.0, top_k=vocab + 3, top_p=0.999),
        SamplingParams(temperature=1.0, top_p=0.05),
    ]
    got = _filtered_probs(logits, params)
    for row in range(rows):
        expected = _reference_probs(logits[row], params[row]).float()
        torch.testing.assert_close(got[row], expected, atol=1e-5, rtol=1e-5, msg=f"row {row} ({params[row]})")


def test_greedy_takes_the_arg_max_after_the_repetition_penalty(rng: torch.Generator) -> None:
    logits = torch.randn(3, 11, generator=rng)
    logits[:, 4] = 10.0
    logits[:, 2] = 9.0
    logits[:, 5] = -20.0
    params = [SamplingParams(), SamplingParams(repetition_penalty=2.0), SamplingParams(repetition_penalty=1.5)]
    histories: list[list[int]] = [[4], [4, 4, 1], [5]]
    tokens = sample_next_tokens(logits, params, [None] * 3, histories)
    # Row 1: 10 / 2 = 5 < 9, so token 2 wins; row 2 only penalizes token 5 (more negative).
    assert tokens == [4, 2, 4]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.9]])
    # Without the penalty token 0 wins; with it, 2/1.1 < 1.9 and -2*1.1 stays the smallest.
    assert sample_next_tokens(logits, [SamplingParams(repetition_penalty=1.1)], [None], [[0, 1]]) == [2]


def test_draws_follow_the_filtered_distribution() -> None:
    torch.manual_seed(secrets.randbits(31))
    n, vocab = 20000, 6
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]]).expand(n, vocab)
    params = [SamplingParams(temperature=0.9, top_k=4, top_p=0.95)] * n
    tokens = torch.tensor(sample_next_tokens(logits, params, [None] * n, [()] * n))
    expected = _reference_probs(logits[0], params[0])
    observed = torch.bincount(tokens, minlength=vocab).double() / n
    # Four standard deviations of a binomial proportion; filtered-out tokens never appear.
    bound = 4 * torch.sqrt(expected * (1 - expected) / n) + 1e-12
    assert torch.all((observed - expected).abs() <= bound), (observed, expected)
    assert observed[expected == 0].sum() == 0


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch(rng: torch.Generator) -> None:
    vocab = 40
    row = torch.randn(1, vocab, generator=rng)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123)

    def draws(batch_others: int) -> list[int]:
        generator = make_generator(123, torch.device("cpu"))
        out = []
        for _ in range(20):
            others = torch.randn(batch_others, vocab, generator=rng)
            logits = torch.cat([others[: batch_others // 2], row, others[batch_others // 2 :]])
            all_params = [SamplingParams(temperature=1.0)] * batch_others
            all_params.insert(batch_others // 2, params)
            gens: list[torch.Generator | None] = [None] * batch_others
            gens.insert(batch_others // 2, generator)
            out.append(sample_next_tokens(logits, all_params, gens, [()] * (batch_others + 1))[batch_others // 2])
        return out

    alone, crowded = draws(0), draws(7)
    assert alone == crowded
    assert len(set(alone)) > 1, "a seeded sampled row still varies from draw to draw"


def test_bad_inputs_raise() -> None:
    with pytest.raises(ConfigurationError, match=r"shape \[n, vocab\]"):
        sample_next_tokens(torch.zeros(4), [SamplingParams()], [None], [()])
    with pytest.raises(ConfigurationError, match="2 sampling parameters"):
        sample_next_tokens(torch.zeros(2, 3), [SamplingParams()], [None], [()])
    assert sample_next_tokens(torch.zeros(0, 3), [], [], []) == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"seed": -3}, "seed"),
        ({"stop_token_ids": (1, -2)}, "stop_token_ids"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_sampling_params_name_the_bad_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_a_lone_stop_string_or_token_is_one_stop() -> None:
    params = SamplingParams(stop="###", stop_token_ids=2)  # type: ignore[arg-type]
    assert params.stop == ("###",) and params.stop_token_ids == (2,)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.5).greedy


@pytest.mark.parametrize("temperature", [1e-45, 1e-300])
def test_a_vanishing_temperature_samples_the_arg_max(temperature: float, rng: torch.Generator) -> None:
    # Below float32's smallest normal number the division gave NaN probabilities and the race picked token 0.
    logits = torch.randn(3, 17, generator=rng)
    logits[:, 0] = -5.0
    params = SamplingParams(temperature=temperature, seed=1)
    got = sample_next_tokens(logits, [params] * 3, [make_generator(1, logits.device)] * 3, [(), (), ()])
    assert got == logits.argmax(dim=-1).tolist()


def test_infinite_logits_and_extreme_penalties_stay_finite_distributions() -> None:
    logits = torch.tensor([[0.0, float("inf"), 1.0, float("inf")], [1.0, 2.0, 3.0, 4.0]])
    params = [SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=1.0, repetition_penalty=1e-30)]
    probs = _filtered_probs(logits, params)
    assert torch.equal(probs[0], torch.tensor([0.0, 0.5, 0.0, 0.5]))  # the +inf entries share the mass
    got = sample_next_tokens(logits, params, [make_generator(3, logits.device), None], [(), [0, 1]])
    assert got[0] in (1, 3) and got[1] in (0, 1)  # a tiny penalty makes seen tokens overwhelmingly likely


def test_sampling_parameters_refuse_what_a_generator_or_the_flags_cannot_take() -> None:
    for kwargs, match in (
        ({"seed": 2**64}, "seed"),
        ({"ignore_eos": "no"}, "ignore_eos"),
        ({"stop": None}, "stop"),
        ({"stop_token_ids": None}, "stop_token_ids"),
    ):
        with pytest.raises(ConfigurationError, match=match):
            SamplingParams(**kwargs)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
