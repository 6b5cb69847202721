"""Sampler edges in types, copies and devices that the mutation run found untested: ids
and logprobs come back as Python ints and floats whatever the batch mix, penalties
never write into the caller's logits (fp32 input included) and always return fp32,
logprobs of half-precision logits are computed in fp32, a row with an empty prompt or
output beside others, and a truncation that must stay on the logits' device (the meta
device stands in for an accelerator: a CPU tensor mixed into it is an error); the whole
sampler and the penalties giving the same results with torch's default device or dtype
set unlike the logits' (meta, bfloat16); and the contracts of the top-p round helper
and the inverse CDF on inputs their callers rarely produce."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from engine.sampler import (
    Sampler,
    SamplingRow,
    _inverse_cdf,
    _min_p_,
    _top_k_,
    _top_p_cutoff,
    apply_penalties,
)
from engine.sampling_params import SamplingParams

V = 32


def logits(seed: int, n: int = 3, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("temps", [(0.0, 0.0, 0.0), (1.0, 0.0, 0.7), (1.0, 0.5, 2.0)])
def test_ids_and_logprobs_are_python_numbers(temps: tuple[float, ...]) -> None:
    rows = [SamplingRow(SamplingParams(temperature=t, logprobs=2), [1], [2]) for t in temps]
    out = Sampler(seed=3)(logits(1), rows)
    for t in out:
        assert type(t.token_id) is int and 0 <= t.token_id < V
        assert type(t.logprob) is float
        assert all(type(i) is int and type(lp) is float for i, lp in t.top_logprobs)


def test_penalties_never_write_into_fp32_logits() -> None:
    x = logits(2)
    before = x.clone()
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=1.0,
                            presence_penalty=0.5)
    out = apply_penalties(x, [SamplingRow(params, [0, 1], [2, 2])] * 3)
    assert torch.equal(x, before) and out.data_ptr() != x.data_ptr()
    assert not torch.equal(out, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_penalties_return_fp32_whatever_the_logits_dtype(dtype: torch.dtype) -> None:
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    out = apply_penalties(logits(3, dtype=dtype), [SamplingRow(params, [], [4])] * 3)
    assert out.dtype == torch.float32
    assert torch.equal(out, apply_penalties(logits(3, dtype=dtype).float(),
                                            [SamplingRow(params, [], [4])] * 3))


def test_logprobs_of_half_logits_are_computed_in_fp32() -> None:
    x = logits(4, dtype=torch.bfloat16)
    out = Sampler()(x, [SamplingRow(SamplingParams(temperature=0.0, logprobs=3), [], [])] * 3)
    want = x.float().log_softmax(-1)
    for i, t in enumerate(out):
        assert t.logprob == want[i, t.token_id].item()  # exact: the same fp32 math
        assert [lp for _, lp in t.top_logprobs] == want[i].topk(3).values.tolist()


def test_repetition_penalty_on_a_first_step_and_an_empty_prompt() -> None:
    """No output yet (the first decode step) in one row, no prompt in another."""
    x = torch.zeros(2, V)
    x[:, 5] = 2.0
    x[:, 6] = 1.5
    rows = [SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=2.0), [5], []),
            SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=2.0), [], [5])]
    out = apply_penalties(x, rows)
    assert out[0, 5].item() == out[1, 5].item() == 1.0 and out[0, 6].item() == 1.5
    assert [t.token_id for t in Sampler()(x, rows)] == [6, 6]


def test_presence_penalty_counts_a_token_once_and_frequency_every_time() -> None:
    x = torch.zeros(1, V)
    params = SamplingParams(temperature=0.0, frequency_penalty=0.25, presence_penalty=1.0)
    out = apply_penalties(x, [SamplingRow(params, [9], [3, 3, 3, 7])])
    assert out[0, 3].item() == -1.75 and out[0, 7].item() == -1.25
    assert out[0, 9].item() == 0.0  # the prompt counts for neither


def test_top_k_edges() -> None:
    x = torch.tensor([[4.0, 3.0, 3.0, 1.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    _top_k_(x, [2, 4, 3])  # row 0: ties with the 2nd largest stay; row 1: k = V masks none
    inf = float("-inf")
    assert x.tolist() == [[4.0, 3.0, 3.0, inf], [4.0, 3.0, 2.0, 1.0], [inf, 2.0, 3.0, 4.0]]
    y = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    _top_k_(y, [1, 0])  # k = 0: off
    assert y.tolist() == [[inf, 2.0], [2.0, 1.0]]


def test_min_p_stays_on_the_logits_device() -> None:
    probs = torch.empty(2, V, device="meta")
    _min_p_(probs, [0.5, 0.0])  # the per-row scales must be made on the meta device too
    assert probs.device.type == "meta"


def test_top_p_round_reports_whether_its_tokens_reached_top_p() -> None:
    # Row 0: 0.4 + 0.3 + 0.2 = 0.9 >= 0.85 only with the last token; row 1: exactly
    # top_p with the last; row 2: short of it (the next round must look further).
    desc = torch.tensor([[0.4, 0.3, 0.2], [0.5, 0.25, 0.0], [0.3, 0.2, 0.1]])
    ps = torch.tensor([[0.85], [0.75], [0.9]])
    cutoff, reached = _top_p_cutoff(desc, ps)
    assert reached.tolist() == [True, True, False]
    assert cutoff[:, 0].tolist() == pytest.approx([0.2, 0.25, 0.1])


def test_inverse_cdf_flags_rows_without_positive_finite_mass() -> None:
    probs = torch.tensor([[0.0, 0.0, 0.0], [0.0, float("nan"), 0.5],
                          [0.5, float("inf"), 0.5], [0.25, 0.5, 0.25]])
    ids, no_mass = _inverse_cdf(probs, torch.full((4,), 0.5))
    assert no_mass.tolist() == [True, True, True, False]
    assert ids[3].item() == 1


def test_sampling_stays_on_the_logits_device() -> None:
    """Temperatures, uniforms and the draw are made on the logits' device: on a GPU a
    CPU tensor among them is an error (or a copy per step). Seeded rows, whose
    generators live on the CPU, hand their uniforms over to that device."""
    rows = [SamplingRow(SamplingParams(temperature=0.7, seed=i), [], [],
                        torch.Generator().manual_seed(i)) for i in range(2)]
    ids, no_mass = Sampler()._sample(torch.empty(2, V, device="meta"), rows)
    assert ids.device.type == no_mass.device.type == "meta" and ids.shape == (2,)


def _batch(vocab: int) -> tuple[torch.Tensor, list[SamplingRow]]:
    """CPU logits with a NaN row, and rows taking every path: greedy and sampled, each
    penalty, top-k, top-p (flat rows need every round), min-p, seeded and shared
    generators, no mass left (a temperature that underflows), logprobs 0, 1 and 3."""
    x = torch.randn(8, vocab, generator=torch.Generator().manual_seed(5)) * 4
    x[1] *= 0.001  # nearly flat: top-p finds its set only in the full sort
    x[6, 3] = float("nan")
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.5, logprobs=3),
        SamplingParams(temperature=1.0, top_p=0.9, seed=1, logprobs=1),
        SamplingParams(temperature=0.7, top_k=20, frequency_penalty=0.5,
                       presence_penalty=0.25, logprobs=0),
        SamplingParams(temperature=1.2, top_p=0.5, min_p=0.1),
        SamplingParams(temperature=0.5, seed=2, repetition_penalty=0.8, top_k=3),
        SamplingParams(temperature=1.0, logprobs=2),  # no mass (below)
        SamplingParams(temperature=1.0, logprobs=2),  # NaN logits
        SamplingParams(temperature=0.0),
    ]
    # A temperature validation rejects (a bug or a bypass): the scaled logits overflow.
    object.__setattr__(params[5], "temperature", 1e-300)
    return x, [SamplingRow(p, [1, 2, vocab - 1], [2, 4, 4],
                           None if p.seed is None else torch.Generator().manual_seed(p.seed))
               for p in params]


@contextmanager
def torch_defaults(device: str, dtype: torch.dtype) -> Iterator[None]:
    """torch's default device and dtype set to these while inside, restored after."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


# Defaults unlike the logits' (CPU, fp32). On a GPU the default device is the CPU and the
# logits are on CUDA; here the logits are on the CPU and the default device is meta: a
# tensor made on the default device is mixed into CPU ones (an error) or indexes them
# (then nothing is written). Model code may set a half-precision default dtype: a float
# made in it is rounded (a top-p of 0.9 becomes 0.8984 in bfloat16).
OTHER_DEFAULTS = [("meta", torch.float32), ("cpu", torch.bfloat16)]


@pytest.mark.parametrize(("device", "dtype"), OTHER_DEFAULTS)
@pytest.mark.parametrize("vocab", [V, 2048])
def test_torch_defaults_unlike_the_logits_change_nothing(
    vocab: int, device: str, dtype: torch.dtype
) -> None:
    """Same ids, logprobs, errors and generator states as with CPU and fp32 defaults."""
    results = []
    for defaults in (("cpu", torch.float32), (device, dtype)):
        x, rows = _batch(vocab)
        sampler = Sampler(seed=4)
        with torch_defaults(*defaults):
            steps = [sampler(x, rows) for _ in range(2)]  # the generators advance
        results.append((steps, [r.generator.get_state() for r in rows if r.generator],
                        {str(d): state for d, state in sampler.rng_state().items()}))
    (want, want_seeded, want_shared), (got, got_seeded, got_shared) = results
    assert got == want
    assert all(torch.equal(a, b) for a, b in zip(got_seeded, want_seeded, strict=True))
    assert got_shared.keys() == want_shared.keys() == {"cpu"}
    assert torch.equal(got_shared["cpu"], want_shared["cpu"])
    errors = [t.error for t in want[0]]
    assert errors[5] is not None and errors[6] is not None
    assert errors[:5] == [None] * 5 and errors[7] is None


@pytest.mark.parametrize(("device", "dtype"), OTHER_DEFAULTS)
def test_penalties_with_torch_defaults_unlike_the_logits(device: str, dtype: torch.dtype) -> None:
    x, rows = _batch(V)
    want = apply_penalties(x, rows)
    with torch_defaults(device, dtype):
        got = apply_penalties(x, rows)
    assert got.device.type == "cpu" and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # row 6: NaN
    assert not torch.equal(want[0], x[0])


def test_a_half_precision_default_dtype_rounds_no_parameter_or_uniform() -> None:
    """In bfloat16 a temperature of 1.2 is 1.203, a min-p of 0.05 is 0.05005, and a
    uniform has 8 bits (128 values in [0.5, 1): a seeded request could not reach most
    tokens of a flat vocabulary). Each moves a draw by a fraction of a token's mass;
    over 64 rows of 2048 near-flat tokens, half seeded, some draw would move."""
    x = torch.randn(64, 2048, generator=torch.Generator().manual_seed(7))

    def rows() -> list[SamplingRow]:
        return [SamplingRow(SamplingParams(temperature=1.2, min_p=0.05, seed=i), [], [],
                            torch.Generator().manual_seed(i)) if i % 2 else
                SamplingRow(SamplingParams(temperature=1.2, min_p=0.05), [], [])
                for i in range(64)]

    want = [t.token_id for t in Sampler(seed=1)(x, rows())]
    with torch_defaults("cpu", torch.bfloat16):
        got = [t.token_id for t in Sampler(seed=1)(x, rows())]
    assert got == want
