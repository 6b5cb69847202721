"""Sampler: exact supports, penalties, logprobs, and per-request seed reproducibility."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from engine.sampler import SampledToken, Sampler, SamplingRow, _top_p_, apply_penalties
from engine.sampling_params import SamplingParams

V = 64


def row(
    params: SamplingParams,
    prompt: Sequence[int] = (),
    output: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> SamplingRow:
    return SamplingRow(params, prompt, output, generator)


def logits_from_probs(probs: list[float], vocab: int = V) -> torch.Tensor:
    """A (vocab,) logit row with the given probabilities on ids 0.. and ~0 elsewhere."""
    out = torch.full((vocab,), -1e9)
    out[: len(probs)] = torch.tensor(probs).log()
    return out


def support(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, n: int) -> set[int]:
    """Token ids drawn over n draws of a batch of n copies of the same row."""
    batch = logits.expand(n, -1).contiguous()
    return {t.token_id for t in sampler(batch, [row(params)] * n)}


def test_greedy_is_argmax_with_ties_to_lowest_id() -> None:
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(0))
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1.0  # tie: 10 wins
    out = Sampler()(logits, [row(SamplingParams(temperature=0.0))] * 8)
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()
    assert out[3].token_id == 10
    assert all(t.logprob is None and t.top_logprobs == [] for t in out)


def test_greedy_accepts_half_precision_and_leaves_logits_untouched() -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    before = logits.clone()
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    out = Sampler()(logits, [row(params, prompt=[1, 2], output=[3])] * 4)
    assert torch.equal(logits, before)
    expected = apply_penalties(logits, [row(params, prompt=[1, 2], output=[3])] * 4)
    assert [t.token_id for t in out] == expected.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0, 100.0])
def test_top_k_1_equals_greedy_at_any_temperature(temperature: float) -> None:
    logits = torch.randn(32, V, generator=torch.Generator().manual_seed(2))
    out = Sampler(seed=3)(logits, [row(SamplingParams(temperature=temperature, top_k=1))] * 32)
    assert [t.token_id for t in out] == logits.argmax(-1).tolist()


def test_top_k_draws_only_the_k_largest() -> None:
    logits = torch.randn(V, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(temperature=2.0, top_k=5)
    drawn = support(Sampler(seed=5), logits, params, n=2000)
    assert drawn == set(logits.topk(5).indices.tolist())  # all 5 appear, nothing else


@pytest.mark.parametrize(
    ("top_p", "expected"),
    [(0.3, {0}), (0.49, {0}), (0.6, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}),
     (0.94, {0, 1, 2}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})],
)  # fmt: skip
def test_top_p_support(top_p: float, expected: set[int]) -> None:
    # Mass before each token: 0, 0.5, 0.8, 0.95: a token is kept while that is < top_p.
    logits = logits_from_probs([0.5, 0.3, 0.15, 0.05])
    assert support(Sampler(seed=6), logits, SamplingParams(top_p=top_p), n=3000) == expected


def test_top_p_falls_back_to_a_full_sort_for_flat_distributions() -> None:
    # 4096 nearly flat, distinct probabilities, most likely first: the 1024 candidates
    # the fast path looks at hold only ~1/4 of the mass, so top_p=0.5 needs the sort.
    flat = -torch.arange(4096, dtype=torch.float64) * 1e-4
    n_keep = 1 + int((flat.softmax(-1).cumsum(-1)[:-1] < 0.5).sum())  # float64 reference
    assert 1500 < n_keep < 2100  # well past the 1024 candidates
    logits = torch.stack([flat.float(), torch.zeros(4096)])
    logits[1, 4000] = 100.0  # a peaked row in the same batch takes the fast path
    out = Sampler(seed=7)(logits, [row(SamplingParams(top_p=0.5))] * 2)
    assert out[1].token_id == 4000
    drawn = support(Sampler(seed=8), logits[0], SamplingParams(top_p=0.5), n=1000)
    assert n_keep - 50 < max(drawn) <= n_keep


def test_top_p_rounds_match_a_full_sort_reference() -> None:
    # Rows from peaked to nearly flat so that every round (topk 128 / 1024 / 8192, then
    # the full sort) decides some row; each must match the plain sort-everything rule.
    vocab, top_p = 16384, 0.9
    gen = torch.Generator().manual_seed(17)
    scales = torch.tensor([8.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.2, 0.05])[:, None]
    probs = (torch.randn(len(scales), vocab, generator=gen) * scales).softmax(-1)
    desc = probs.sort(-1, descending=True).values
    n_keep = 1 + (desc.cumsum(-1)[:, :-1] < top_p).sum(-1)  # (rows,)
    expected = probs >= desc.gather(1, (n_keep - 1)[:, None])
    for lo, hi in [(1, 128), (129, 1024), (1025, 8192), (8193, vocab)]:
        assert ((n_keep >= lo) & (n_keep <= hi)).any(), (lo, hi, n_keep)
    out = probs.clone()
    _top_p_(out, [top_p] * len(scales))
    assert torch.equal(out > 0, expected)
    assert torch.equal(out[expected], probs[expected])  # kept mass untouched


@pytest.mark.parametrize(
    ("min_p", "expected"),
    [(0.05, {0, 1, 2, 3}), (0.2, {0, 1, 2}), (0.5, {0, 1}), (0.7, {0}), (1.0, {0})],
)
def test_min_p_support(min_p: float, expected: set[int]) -> None:
    # p / p_max = 1, 0.6, 0.3, 0.1
    logits = logits_from_probs([0.5, 0.3, 0.15, 0.05])
    assert support(Sampler(seed=9), logits, SamplingParams(min_p=min_p), n=3000) == expected


def test_temperature_scales_before_truncation() -> None:
    # At temperature 0.5 the probabilities become ~[0.685, 0.247, 0.062, 0.007], so
    # top_p=0.6 keeps {0}; at temperature 1 (0.5 first) it keeps {0, 1}.
    logits = logits_from_probs([0.5, 0.3, 0.15, 0.05])
    sampler = Sampler(seed=10)
    assert support(sampler, logits, SamplingParams(temperature=0.5, top_p=0.6), 2000) == {0}
    assert support(sampler, logits, SamplingParams(temperature=1.0, top_p=0.6), 2000) == {0, 1}


def test_distribution_at_temperature_1_matches_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    probs = logits.softmax(-1)
    n = 20000
    drawn = support_counts(Sampler(seed=11), logits, n)
    chi2 = sum((drawn[i] - n * p) ** 2 / (n * p) for i, p in enumerate(probs.tolist()))
    assert sum(drawn.values()) == n and set(drawn) <= set(range(6))
    assert chi2 < 20.5  # 5 degrees of freedom: p ~= 0.001 (deterministic: fixed seed)


def support_counts(sampler: Sampler, logits: torch.Tensor, n: int) -> Counter[int]:
    batch = logits.expand(n, -1).contiguous()
    return Counter(t.token_id for t in sampler(batch, [row(SamplingParams())] * n))


def run_seeded(
    seed: int, steps: list[torch.Tensor], position: int, mates: list[SamplingParams]
) -> list[int]:
    """Decode len(steps) tokens for one seeded request placed among unseeded mates."""
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=seed)
    sampler = Sampler(seed=position + 100)  # the shared stream differs per run too
    tokens: list[int] = []
    noise = torch.Generator().manual_seed(position)
    for step_logits in steps:
        rows = [row(p) for p in mates]
        rows.insert(position, row(params, output=list(tokens), generator=gen))
        batch = torch.randn(len(rows), V, generator=noise)  # mates' logits vary per run
        batch[position] = step_logits
        tokens.append(sampler(batch, rows)[position].token_id)
    return tokens


def test_seed_reproducible_regardless_of_batch_mates() -> None:
    steps = [torch.randn(V, generator=torch.Generator().manual_seed(s)) for s in range(30)]
    alone = run_seeded(1234, steps, 0, [])
    mates = [SamplingParams(temperature=0.0), SamplingParams(top_k=3), SamplingParams(min_p=0.1),
             SamplingParams(seed=7, temperature=1.3)]  # fmt: skip
    assert run_seeded(1234, steps, 2, mates) == alone
    assert run_seeded(1234, steps, 4, mates[::-1]) == alone
    assert run_seeded(1234, steps, 1, mates[:1]) == alone
    assert run_seeded(4321, steps, 0, []) != alone


def test_unseeded_rows_use_the_shared_generator_deterministically() -> None:
    logits = torch.randn(16, V, generator=torch.Generator().manual_seed(12))
    rows = [row(SamplingParams())] * 16
    a, b = Sampler(seed=1)(logits, rows), Sampler(seed=1)(logits, rows)
    assert a == b
    assert a != Sampler(seed=2)(logits, rows)


def test_repetition_penalty_divides_positive_and_multiplies_negative() -> None:
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0, 0.5, 0.0]]).repeat(3, 1)
    rows = [
        row(SamplingParams(frequency_penalty=1.0), prompt=[0, 1]),  # prompt is not output
        row(SamplingParams(repetition_penalty=2.0), prompt=[0, 1], output=[3, 3, 5]),
        row(SamplingParams(repetition_penalty=0.5), prompt=[2], output=[1]),  # < 1 boosts
    ]
    assert apply_penalties(logits, rows).tolist() == [
        [2.0, -2.0, 3.0, -1.0, 0.5, 0.0],
        [1.0, -4.0, 3.0, -2.0, 0.5, 0.0],
        [2.0, -1.0, 6.0, -1.0, 0.5, 0.0],
    ]


def test_frequency_and_presence_penalties_count_output_only() -> None:
    logits = torch.zeros(2, 6)
    rows = [
        row(SamplingParams(frequency_penalty=0.5), prompt=[4], output=[1, 1, 1, 2]),
        row(SamplingParams(presence_penalty=1.5), prompt=[4], output=[1, 1, 1, 2]),
    ]
    out = apply_penalties(logits, rows)
    assert out.tolist() == [[0.0, -1.5, -0.5, 0.0, 0.0, 0.0], [0.0, -1.5, -1.5, 0.0, 0.0, 0.0]]


def test_penalties_combine_per_row_and_spare_other_rows() -> None:
    logits = torch.tensor([[1.0, 4.0, -2.0, 0.0], [1.0, 4.0, -2.0, 0.0], [1.0, 4.0, -2.0, 0.0]])
    both = SamplingParams(repetition_penalty=4.0, frequency_penalty=1.0, presence_penalty=0.5)
    rows = [
        row(SamplingParams(), output=[0, 1]),  # no penalties: unchanged
        row(both, prompt=torch.tensor([2]), output=[1, 1]),  # tensors work too
        row(SamplingParams(frequency_penalty=-2.0), output=[3]),  # negative: a bonus
    ]
    before = logits.clone()
    out = apply_penalties(logits, rows)
    assert torch.equal(logits, before)
    # row 1: token 1: 4 / 4 - 1 * 2 - 0.5 = -1.5; token 2 (prompt only): -2 * 4 = -8
    assert out.tolist() == [[1.0, 4.0, -2.0, 0.0], [1.0, -1.5, -8.0, 0.0], [1.0, 4.0, -2.0, 2.0]]


def test_penalties_steer_greedy() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0]])
    params = SamplingParams(temperature=0.0, presence_penalty=2.0)
    assert Sampler()(logits, [row(params, output=[0])])[0].token_id == 1


def test_logprobs_are_raw_log_softmax_with_sorted_top_n() -> None:
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(13))
    raw = logits.log_softmax(-1)
    # Penalties and temperature change what is sampled, never the reported logprobs.
    params = SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=3.0)
    rows = [
        row(params, output=logits[0].topk(8).indices.tolist()),  # pushes argmax outside top-5
        row(SamplingParams(temperature=2.0, logprobs=0)),
        row(SamplingParams(temperature=0.0)),
    ]
    out = Sampler(seed=14)(logits, rows)
    for i in (0, 1):
        assert out[i].logprob == pytest.approx(raw[i, out[i].token_id].item(), abs=1e-6)
    top = raw[0].topk(5)
    assert [t for t, _ in out[0].top_logprobs] == top.indices.tolist()
    assert [lp for _, lp in out[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert out[0].token_id not in top.indices.tolist()  # still reported in .logprob
    assert out[1].top_logprobs == [] and out[2].logprob is None


def test_mixed_batch_routes_each_row() -> None:
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(15))
    rows = [
        row(SamplingParams(temperature=0.0)),
        row(SamplingParams(top_k=1, temperature=3.0)),
        row(SamplingParams(temperature=0.0, frequency_penalty=2.0), output=[0] * 100),
        row(SamplingParams(min_p=1.0), generator=torch.Generator().manual_seed(0)),
    ]
    logits[2, 0] = 50.0
    out = Sampler()(logits, rows)
    assert isinstance(out[0], SampledToken)
    argmax = logits.argmax(-1).tolist()
    assert out[0].token_id == argmax[0] and out[1].token_id == argmax[1]
    assert out[2].token_id == logits[2, 1:].argmax().item() + 1  # 50 - 200 loses
    assert out[3].token_id == argmax[3]


def test_empty_batch_and_shape_mismatch() -> None:
    assert Sampler()(torch.empty(0, V), []) == []
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.zeros(2, V), [row(SamplingParams())])


def test_zero_probability_tokens_are_never_drawn() -> None:
    # All mass on the last id: the inverse CDF must not land on the masked ids before it,
    # even for uniforms at the very top of [0, 1).
    logits = torch.full((1000, V), -math.inf)
    logits[:, V - 1] = 0.0
    logits[:, 0] = -30.0  # tiny but non-zero: may appear, never the -inf ids
    out = Sampler(seed=16)(logits, [row(SamplingParams())] * 1000)
    assert {t.token_id for t in out} <= {0, V - 1}
