"""The sampler never emits an id outside [0, V): rows it cannot sample honestly (NaN or
infinite logits, no mass left, poison params that bypassed validation) come back with
``error`` set, and their batch mates are sampled exactly as without them."""

from __future__ import annotations

import math

import pytest
import torch

from engine.sampler import (
    LOGPROB_FLOOR,
    NO_MASS,
    NONFINITE_LOGITS,
    Sampler,
    SamplingRow,
)
from engine.sampling_params import SamplingParams

V = 64


def poisoned(**fields: float) -> SamplingParams:
    """Params with values validation would reject (as a bug or a bypass could produce)."""
    p = SamplingParams(temperature=1.0)
    for k, v in fields.items():
        object.__setattr__(p, k, v)
    return p


def rows_of(*params: SamplingParams) -> list[SamplingRow]:
    return [SamplingRow(p, [1, 2], [3], torch.Generator().manual_seed(i))
            for i, p in enumerate(params)]


def clean_logits(n: int) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(
    ("value", "greedy"),
    [(math.nan, True), (math.nan, False), (math.inf, True), (math.inf, False),
     (-math.inf, False)],
)  # fmt: skip
def test_non_finite_logits_fail_only_their_row(value: float, greedy: bool) -> None:
    t = 0.0 if greedy else 0.8
    params = [SamplingParams(temperature=t, seed=i, logprobs=2) for i in range(3)]
    logits = clean_logits(3)
    expected = Sampler(seed=1)(logits, rows_of(*params))
    if value == -math.inf:
        logits[1] = value  # nothing finite left to sample
    else:
        logits[1, 5] = value
    out = Sampler(seed=1)(logits, rows_of(*params))
    assert out[1].error == NONFINITE_LOGITS
    assert 0 <= out[1].token_id < V
    assert out[1].logprob is None and out[1].top_logprobs == []
    for i in (0, 2):
        assert out[i].error is None
        assert out[i].token_id == expected[i].token_id
        assert out[i].logprob == expected[i].logprob


@pytest.mark.parametrize(
    "fields",
    [{"temperature": 1e-300}, {"temperature": math.nan}, {"temperature": -1.0},
     {"repetition_penalty": 1e-300}, {"repetition_penalty": math.nan},
     {"repetition_penalty": math.inf}, {"presence_penalty": math.inf},
     {"frequency_penalty": math.nan}],
)  # fmt: skip
def test_poison_params_never_yield_an_out_of_vocab_id(fields: dict[str, float]) -> None:
    rows = rows_of(SamplingParams(temperature=0.5, seed=0), poisoned(**fields))
    # Large logits everywhere so penalties and temperature have something to overflow.
    logits = clean_logits(2) * 1e3
    out = Sampler()(logits, rows)
    assert all(0 <= t.token_id < V for t in out)
    assert out[0].error is None
    assert out[0].token_id == Sampler()(logits[:1], rows[:1])[0].token_id


def test_underflowing_temperature_is_reported_not_drawn() -> None:
    out = Sampler()(clean_logits(1), rows_of(poisoned(temperature=1e-300)))
    assert out[0].error == NO_MASS
    assert 0 <= out[0].token_id < V


def test_repetition_penalty_of_zero_in_fp32_cannot_escape_the_vocab() -> None:
    # 1e-300 is 0 in fp32: positive seen logits / 0 = inf. Greedy picks a seen token
    # (inside the vocabulary); sampling reports the broken distribution.
    logits = clean_logits(2).abs() + 1.0
    p_greedy = poisoned(repetition_penalty=1e-300, temperature=0.0)
    out = Sampler()(logits, rows_of(p_greedy, poisoned(repetition_penalty=1e-300)))
    assert out[0].token_id in (1, 2, 3) and out[0].error is None
    assert out[1].error == NO_MASS and 0 <= out[1].token_id < V


def test_minus_inf_logprobs_are_reported_as_the_floor() -> None:
    logits = torch.full((1, V), -math.inf)
    logits[0, :3] = torch.tensor([0.0, -1.0, -2.0])
    out = Sampler()(logits, rows_of(SamplingParams(temperature=0.0, logprobs=5)))
    lps = [lp for _, lp in out[0].top_logprobs]
    assert out[0].token_id == 0 and out[0].error is None
    assert lps[3:] == [LOGPROB_FLOOR, LOGPROB_FLOOR]
    assert all(math.isfinite(lp) for lp in lps)
    assert lps[:3] == pytest.approx(torch.tensor([0.0, -1.0, -2.0]).log_softmax(0).tolist())


def test_asking_for_more_alternatives_than_the_vocab_holds() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    out = Sampler()(logits, rows_of(SamplingParams(temperature=0.0, logprobs=20)))
    assert [t for t, _ in out[0].top_logprobs] == [0, 1, 2]


def test_restoring_the_shared_generators_replays_their_draws() -> None:
    # The engine replays a failed step's sampling from this snapshot.
    sampler = Sampler(seed=3)
    logits = clean_logits(4)
    rows = [SamplingRow(SamplingParams(temperature=1.0), [], [])] * 4
    sampler(logits, rows)  # the shared CPU generator exists from here on
    state = sampler.rng_state()
    first = [t.token_id for t in sampler(logits, rows)]
    sampler(logits, rows)  # the generator moves on
    sampler.set_rng_state(state)
    assert [t.token_id for t in sampler(logits, rows)] == first


def test_a_generator_created_after_the_snapshot_restarts_from_the_seed() -> None:
    fresh = Sampler(seed=3)
    empty = fresh.rng_state()
    assert empty == {}
    logits = clean_logits(4)
    rows = [SamplingRow(SamplingParams(temperature=1.0), [], [])] * 4
    first = [t.token_id for t in fresh(logits, rows)]
    fresh(logits, rows)
    fresh.set_rng_state(empty)
    assert [t.token_id for t in fresh(logits, rows)] == first
