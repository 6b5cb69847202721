"""Sampler edges the mutation run found untested: exact top-p boundaries, rows that
finish in different top-p rounds, min-p per row, the inverse CDF at u = 0, logprob
counts of 0 and 1, penalties on small positive logits, seeded rows beside shared ones,
and the default seed."""

from __future__ import annotations

import torch

from engine.sampler import Sampler, SamplingRow, _inverse_cdf, _min_p_, _top_p_
from engine.sampling_params import SamplingParams


def test_top_p_boundary_is_exact() -> None:
    # Mass before token 2 is exactly 0.75: kept only when top_p is above it (and then
    # token 3, tied with it, too).
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 2)
    _top_p_(probs, [0.75, 0.75 + 2**-20])
    assert probs.tolist() == [[0.5, 0.25, 0.0, 0.0], [0.5, 0.25, 0.125, 0.125]]


def test_top_p_of_one_leaves_even_vanishing_tokens_drawable() -> None:
    probs = torch.tensor([[0.0, -50.0, -50.0]]).softmax(-1)  # fp32: 1.0 then ~2e-22
    assert probs[0].cumsum(0)[0] == 1.0
    before = probs.clone()
    _top_p_(probs, [1.0])
    assert torch.equal(probs, before)


def test_top_p_rows_finishing_in_different_rounds() -> None:
    vocab = 2048
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(vocab, generator=g) * 8  # top_p reached within 128 tokens
    flat = torch.randn(vocab, generator=g) * 0.01  # needs the full sort
    probs = torch.stack([peaked, flat]).softmax(-1)
    ref = probs.clone()
    for row in range(2):  # reference: one full sort per row
        desc = ref[row].sort(descending=True).values
        keep = (desc.cumsum(0) - desc) < 0.9
        cutoff = desc[keep].min()
        ref[row] = ref[row] * (ref[row] >= cutoff)
    _top_p_(probs, [0.9, 0.9])
    assert torch.equal(probs, ref)
    assert (probs[0] > 0).sum() < 128 < (probs[1] > 0).sum()


def test_min_p_scales_by_each_rows_own_maximum() -> None:
    probs = torch.tensor([[0.75, 0.125, 0.125], [0.5, 0.25, 0.25]])
    _min_p_(probs, [0.5, 0.5])  # thresholds 0.375 and 0.25 (kept: not below it)
    assert probs.tolist() == [[0.75, 0.0, 0.0], [0.5, 0.25, 0.25]]


def test_inverse_cdf_never_draws_a_zero_probability_token_even_at_u_zero() -> None:
    probs = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]])
    ids, no_mass = _inverse_cdf(probs.clone(), torch.tensor([0.0, 0.0]))
    assert ids.tolist() == [2, 0] and no_mass.tolist() == [False, False]
    ids, _ = _inverse_cdf(probs.clone(), torch.tensor([0.5, 0.5]))
    assert ids.tolist() == [3, 2]  # a uniform exactly on a boundary goes to the right


def test_logprob_counts_zero_and_one() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    zero = Sampler()(logits, [SamplingRow(SamplingParams(temperature=0.0, logprobs=0), [], [])])
    assert zero[0].logprob is not None and zero[0].top_logprobs == []
    one = Sampler()(logits, [SamplingRow(SamplingParams(temperature=0.0, logprobs=1), [], [])])
    assert [t for t, _ in one[0].top_logprobs] == [0]


def test_repetition_penalty_divides_small_positive_logits_too() -> None:
    logits = torch.tensor([[0.5, 0.6, -0.5]])
    params = SamplingParams(temperature=0.0, repetition_penalty=4.0)
    # 0.5 / 4 = 0.125 (multiplying would give 2.0 and win); 0.6 unseen stays.
    out = Sampler()(logits, [SamplingRow(params, [0], [2])])
    assert out[0].token_id == 1


def test_a_seeded_row_does_not_touch_its_neighbours_uniform() -> None:
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    shared = SamplingParams(temperature=1.0)
    seeded = SamplingParams(temperature=1.0, seed=9)
    alone = Sampler(seed=5)(logits, [SamplingRow(shared, [], [])])[0].token_id
    pair = Sampler(seed=5)(logits.expand(2, -1).contiguous(), [
        SamplingRow(seeded, [], [], torch.Generator().manual_seed(9)),
        SamplingRow(shared, [], [])])
    assert pair[1].token_id == alone


def test_the_default_seed_is_zero() -> None:
    logits = torch.zeros(16, 64)
    rows = [SamplingRow(SamplingParams(temperature=1.0), [], [])] * 16
    assert ([t.token_id for t in Sampler()(logits, rows)]
            == [t.token_id for t in Sampler(seed=0)(logits, rows)]
            != [t.token_id for t in Sampler(seed=1)(logits, rows)])


def test_top_p_keeps_the_last_token_when_the_mass_before_it_is_short() -> None:
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    _top_p_(probs, [0.95])  # mass before the 0.1 token is 0.9: it is needed
    assert probs.tolist() == torch.tensor([[0.4, 0.3, 0.2, 0.1]]).tolist()
