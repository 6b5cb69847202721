"""Sampler edges the mutation run found untested: exact top-p boundaries, rows that
finish in different top-p rounds, min-p per row, the inverse CDF at u = 0, logprob
counts of 0 and 1, penalties on small positive logits, seeded rows beside shared ones,
the default seed; and the work the passes skip: the rows a full sort is left for, a
batch without penalties, truncations that are off, top logprobs nobody asked for."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

import engine.sampler as sampler_module
from engine.sampler import Sampler, SamplingRow, _inverse_cdf, _min_p_, _top_k_, _top_p_
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


class _Kernels(TorchFunctionMode):
    """Records the name, first argument's shape and other arguments of every torch call
    made inside."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...], tuple[object, ...]]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name != "__get__":  # attribute reads (.shape, .device) do no work
            first = args[0] if args else None
            shape = tuple(first.shape) if isinstance(first, torch.Tensor) else ()
            self.calls.append((name, shape, tuple(args[1:])))
        return func(*args, **(kwargs or {}))


def test_top_p_orders_the_whole_vocabulary_only_for_rows_that_need_it() -> None:
    """The rounds exist for speed (a full sort at V=49152 costs ~30x a top-128): a row
    whose mass reaches top_p within a round leaves the later rounds, and only the rows
    still short of it after the last round are sorted in full."""
    vocab = 2048
    g = torch.Generator().manual_seed(0)
    peaked = torch.randn(vocab, generator=g) * 8  # top_p reached within 128 tokens
    flat = torch.randn(vocab, generator=g) * 0.01  # short of it even after 1024
    probs = torch.stack([peaked, flat]).softmax(-1)
    with _Kernels() as kernels:
        _top_p_(probs, [0.9, 0.9])
    # (rows, k) of each ordering kernel; a sort orders all V (as would a topk of V)
    ordering = [(shape, vocab if name == "sort" else k[0])
                for name, shape, k in kernels.calls if name in ("topk", "sort")]
    assert ordering == [((2, vocab), 128), ((1, vocab), 1024), ((1, vocab), vocab)]


def test_a_batch_without_penalties_skips_the_penalty_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """The penalty pass makes an fp32 copy of the whole (S, V) logits: a batch without
    penalties, greedy or sampled, must not pay for it every step."""
    def no_pass(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        raise AssertionError("apply_penalties on a batch without penalties")

    monkeypatch.setattr(sampler_module, "apply_penalties", no_pass)
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    for temperature in (0.0, 1.0):
        rows = [SamplingRow(SamplingParams(temperature=temperature), [1], [2])] * 2
        assert len(Sampler()(logits, rows)) == 2


def test_truncations_that_are_off_do_no_work() -> None:
    """top_k of 0 or V, top_p of 1 and min_p of 0 leave every row alone: each pass runs
    over the rows that need it, and here none does (not even a copy of them)."""
    probs = torch.full((2, 16), 1 / 16)
    with _Kernels() as kernels:
        _top_k_(probs, [0, 16])
        _top_p_(probs, [1.0, 1.0])
        _min_p_(probs, [0.0, 0.0])
    assert kernels.calls == []


def test_no_alternatives_asked_none_computed() -> None:
    logits = torch.randn(2, 16, generator=torch.Generator().manual_seed(2))
    rows = [SamplingRow(SamplingParams(temperature=0.0, logprobs=0), [], [])] * 2
    with _Kernels() as kernels:
        out = Sampler()(logits, rows)
    assert all(t.logprob is not None and t.top_logprobs == [] for t in out)
    assert "topk" not in [name for name, _, _ in kernels.calls]


def test_a_batch_where_every_row_samples_is_not_gathered() -> None:
    """Gathering the sampled rows copies them: when they are the whole batch (the
    common case with sampling), the logits are used as they are."""
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(3))
    rows = [SamplingRow(SamplingParams(temperature=1.0), [], [])] * 3
    with _Kernels() as kernels:
        Sampler()(logits, rows)
    gathers = [(shape, index) for name, shape, index in kernels.calls
               if name == "__getitem__" and isinstance(index[0], list)]
    assert gathers == []
