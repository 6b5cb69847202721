"""Turn one step's logits into one token per sequence.

Per row, in order::

    raw logits ──► penalties ──► greedy: argmax
                                 else:   / temperature ─► top-k ─► softmax ─► top-p
                                         ─► min-p ─► inverse-CDF draw
    raw logits ──► log_softmax ─► logprobs (when asked; never sees penalties/temperature)

A row whose logits hold a NaN or +inf, or no finite value at all, cannot be sampled
honestly: its SampledToken carries ``error`` (the engine fails that request alone) and
a token id that is still inside the vocabulary, so nothing downstream indexes past it.
The same holds for a row whose distribution ends up with no positive mass. Whatever
happens, every returned id is in [0, V).

Everything is batched over the rows that need it; Python loops run only over rows with
their own generator (one uniform draw each) and over the results. A row's draw depends
only on its own logits and its generator, so a seeded request draws the same numbers
whatever else is in the batch. Its tokens are the same too as long as its logits are:
the forward pass is not bit-identical across batch shapes (matmul tilings differ, ~1e-5
in a logprob), so a draw landing within that of a boundary between two tokens -- like
a greedy near-tie -- can pick the other one.

The Sampler never modifies the caller's logits and holds no per-request state: the
request owns its generator (created with ``manual_seed(seed)``) and passes it in each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams

# Top-p looks at the most likely tokens in growing rounds; a row moves on to the next
# round only while its mass so far is short of top_p. On CPU at V=49152, topk over 64
# rows costs ~8 / 30 / 60 ms for k = 128 / 1024 / 8192 against ~235 ms for a full sort,
# which is left for rows nearly flat over thousands of tokens.
_TOP_P_ROUNDS = (128, 1024, 8192)
# A logprob of -inf (a token the model rules out) is reported as this, as OpenAI's API
# does: JSON has no infinity, and every client can sort and compare a finite number.
LOGPROB_FLOOR = -9999.0
NONFINITE_LOGITS = "the model produced NaN or infinite logits for this request"
NO_MASS = "no token has positive probability after penalties and truncation"


@dataclass
class SamplingRow:
    """One sequence that samples a token this step.

    generator: the request's own generator when ``params.seed`` is set (owned by the
    request, advanced by each draw); None uses the Sampler's shared generator.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]  # repetition_penalty looks at prompt + output
    output_token_ids: Sequence[int]  # presence/frequency look at output only
    generator: torch.Generator | None = None


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None  # log_softmax of the raw logits, when params.logprobs is set
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # most likely first
    # Set when the row could not be sampled (see the module doc); token_id is then a
    # placeholder inside the vocabulary and must not be used as the request's token.
    error: str | None = None


class Sampler:
    """Samples one token per row; holds only the shared generator for unseeded rows."""

    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._shared: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        # logits: (S, V), any float dtype, row i belongs to rows[i]
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(rows)} rows")
        if not rows:
            return []
        vocab = logits.shape[1]
        # amax propagates NaN: one reduction finds rows with a NaN, a +inf, or no
        # finite logit at all.
        broken = ~torch.isfinite(logits.amax(dim=-1))  # (S,)
        has_penalties = any(r.params.has_penalties for r in rows)
        x = apply_penalties(logits, rows) if has_penalties else logits  # (S, V)
        sample_idx = [i for i, r in enumerate(rows) if not r.params.greedy]
        no_mass = torch.zeros_like(broken)
        if not sample_idx:
            token_ids = x.argmax(dim=-1)  # the common all-greedy batch: one kernel
        else:
            token_ids = torch.empty(len(rows), dtype=torch.long, device=x.device)
            greedy_idx = [i for i, r in enumerate(rows) if r.params.greedy]
            if greedy_idx:
                token_ids[greedy_idx] = x[greedy_idx].argmax(dim=-1)
            sampled_rows = [rows[i] for i in sample_idx]
            sub = x if len(sample_idx) == len(rows) else x[sample_idx]
            token_ids[sample_idx], no_mass[sample_idx] = self._sample(sub, sampled_rows)
        # One device-to-host read per step (each is a wait for the GPU): tokens and flags
        # travel together.
        ids, broken_rows, no_mass_rows = torch.stack(
            (token_ids.clamp_(0, vocab - 1), broken.long(), no_mass.long())).tolist()
        errors = [NONFINITE_LOGITS if b else NO_MASS if m else None
                  for b, m in zip(broken_rows, no_mass_rows, strict=True)]
        return _with_logprobs(logits, rows, ids, errors)

    def _sample(
        self, logits: torch.Tensor, rows: list[SamplingRow]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (n, V) -> token ids (n,) and whether each row had no mass to draw from."""
        # Every tensor the sampler makes names the logits' device and, if float, float32
        # (here, in _uniforms, _top_p_, _min_p_): torch's defaults are no guide. On a GPU
        # the default device is the CPU, and model code may set a half-precision default
        # dtype; temperatures, top-p, min-p or uniforms rounded to it change the draw.
        temps = torch.tensor(
            [r.params.temperature for r in rows], dtype=torch.float32, device=logits.device
        )
        z = logits.float() / temps[:, None]  # a fresh tensor: safe to edit in place
        _top_k_(z, [r.params.top_k for r in rows])
        probs = z.softmax(dim=-1)  # (n, V)
        _top_p_(probs, [r.params.top_p for r in rows])
        _min_p_(probs, [r.params.min_p for r in rows])
        u = self._uniforms([r.generator for r in rows], probs.device)
        return _inverse_cdf(probs, u)

    def _uniforms(self, gens: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
        """One U[0, 1) per row: seeded rows from their own generator, the rest shared."""
        u = torch.empty(len(gens), dtype=torch.float32, device=device)
        shared_idx = [i for i, g in enumerate(gens) if g is None]
        if shared_idx:
            u[shared_idx] = torch.rand(len(shared_idx), generator=self._shared_generator(device),
                                       dtype=torch.float32, device=device)
        for i, g in enumerate(gens):
            if g is not None:
                u[i : i + 1] = torch.rand(1, generator=g, dtype=torch.float32,
                                          device=g.device).to(device)
        return u

    def rng_state(self) -> dict[torch.device, torch.Tensor]:
        """The shared generators' states: a step that failed is replayed from them, so
        its discarded draws do not shift what the retry samples."""
        return {d: g.get_state() for d, g in self._shared.items()}

    def set_rng_state(self, state: dict[torch.device, torch.Tensor]) -> None:
        for d in list(self._shared):
            if d in state:
                self._shared[d].set_state(state[d])
            else:  # created after the snapshot: it restarts from the seed
                del self._shared[d]

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._shared:
            self._shared[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._shared[device]


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Return a float32 copy of ``logits`` (S, V) with each row's penalties applied.

    repetition (HF/CTRL): on tokens in prompt or output, positive logits are divided by
    the penalty and negative ones multiplied. frequency: minus penalty * count in output.
    presence: minus penalty once for any token in output. Rows without penalties are
    copied unchanged; the caller's tensor is never modified.

    Only the (row, token) entries that occur are touched, gathered and scattered by
    flat index, so the cost follows the number of tokens seen, not S * V.
    """
    out = logits.to(torch.float32, copy=True)  # contiguous: its view(-1) indexes (row, token)
    idx = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if not idx:
        return out
    vocab, device = out.shape[1], out.device
    flat = out.view(-1)  # (S * V,)

    def per_row(values: list[float]) -> torch.Tensor:  # (S,), looked up by row index
        return torch.tensor(values, dtype=torch.float32, device=device)

    output_pos = _flat_positions(idx, [rows[i].output_token_ids for i in idx], vocab, device)
    rep = [r.params.repetition_penalty for r in rows]
    rep_idx = [i for i in idx if rep[i] != 1.0]
    if rep_idx:  # rows without it skip their prompt, which can be long
        prompt_pos = _flat_positions(
            rep_idx, [rows[i].prompt_token_ids for i in rep_idx], vocab, device
        )
        seen = torch.unique(torch.cat([output_pos, prompt_pos]))  # (U,)
        v, penalty = flat[seen], per_row(rep)[seen // vocab]
        flat[seen] = torch.where(v > 0, v / penalty, v * penalty)
    pos, count = torch.unique(output_pos, return_counts=True)  # (U,) each seen once
    row = pos // vocab
    freq = per_row([r.params.frequency_penalty for r in rows])[row]
    presence = per_row([r.params.presence_penalty for r in rows])[row]
    flat[pos] -= freq * count + presence
    return out


def _flat_positions(
    row_ids: list[int], seqs: Sequence[Sequence[int]], vocab: int, device: torch.device
) -> torch.Tensor:
    """(sum of lengths,) long: row * vocab + token for each token of each row's sequence."""
    parts = [torch.as_tensor(s, dtype=torch.long, device=device).reshape(-1) for s in seqs]
    lengths = torch.tensor([p.numel() for p in parts], device=device)
    rows = torch.repeat_interleave(torch.tensor(row_ids, device=device), lengths)
    return rows * vocab + torch.cat(parts)


def _top_k_(z: torch.Tensor, top_k: list[int]) -> None:
    """Mask (in place) logits below each row's k-th largest; ties with it are kept."""
    vocab = z.shape[1]
    idx = [i for i, k in enumerate(top_k) if 0 < k < vocab]
    if not idx:
        return
    ks = [top_k[i] for i in idx]
    sub = z[idx]  # (m, V)
    # The largest k from the host list, not the tensor: reading a GPU tensor waits for it.
    kth = sub.topk(max(ks)).values.gather(
        1, torch.tensor(ks, device=z.device)[:, None] - 1)  # (m, 1)
    z[idx] = sub.masked_fill(sub < kth, float("-inf"))


def _top_p_(probs: torch.Tensor, top_p: list[float]) -> None:
    """Zero (in place) tokens outside each row's smallest set with mass >= top_p.

    The set is a cut-off probability: tokens tied with the last one kept are kept too,
    which makes the result independent of how a sort orders ties.
    """
    idx = [i for i, p in enumerate(top_p) if p < 1.0]
    if not idx:
        return
    sub = probs[idx]  # (m, V)
    ps = torch.tensor([top_p[i] for i in idx], dtype=torch.float32,
                      device=probs.device)[:, None]  # (m, 1)
    cutoff = torch.empty_like(ps)
    pending = torch.arange(len(idx), device=probs.device)  # rows still short of top_p
    vocab = sub.shape[1]
    for k in (*(r for r in _TOP_P_ROUNDS if r < vocab), vocab):
        rows = sub[pending]
        desc = rows.topk(k).values if k < vocab else rows.sort(descending=True).values
        row_cutoff, reached = _top_p_cutoff(desc, ps[pending])
        done = reached | (k == vocab)
        cutoff[pending[done]] = row_cutoff[done]
        pending = pending[~done]
        if pending.numel() == 0:
            break
    probs[idx] = sub.mul_(sub >= cutoff)  # zeroes the rest; ~2x cheaper than masked_fill


def _top_p_cutoff(desc: torch.Tensor, ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From each row's most likely probabilities, descending (m, K), and top_p (m, 1):
    the smallest kept probability (m, 1) and whether the K reached top_p (m,)."""
    csum = desc.cumsum(dim=-1)  # (m, K), non-decreasing even in floating point
    # Token j is kept when the mass before it is still short of top_p; token 0 always is.
    n_keep = 1 + (csum[:, :-1] < ps).sum(dim=-1, keepdim=True)  # (m, 1)
    return desc.gather(1, n_keep - 1), csum[:, -1] >= ps[:, 0]


def _min_p_(probs: torch.Tensor, min_p: list[float]) -> None:
    """Zero (in place) tokens with p < min_p * p_max; the most likely token stays."""
    idx = [i for i, m in enumerate(min_p) if m > 0.0]
    if not idx:
        return
    sub = probs[idx]  # (m, V)
    scale = torch.tensor([min_p[i] for i in idx], dtype=torch.float32,
                         device=probs.device)[:, None]
    threshold = scale * sub.amax(dim=-1, keepdim=True)  # (m, 1)
    probs[idx] = sub.mul_(sub >= threshold)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row from unnormalised probs (n, V) with uniforms u (n,).

    Returns the ids (n,) and a mask (n,) of rows whose total mass is not a positive
    finite number: their id is meaningless (possibly V) and the caller must not use it.

    One uniform per row (not V exponentials as the Gumbel trick needs) keeps a row's
    draw a function of its own generator and costs a cumsum: ~20x cheaper on CPU.
    """
    cdf = probs.cumsum_(dim=-1)  # (n, V); in place: the caller is done with probs
    total = cdf[:, -1:]  # (n, 1)
    # u < 1, so the target stays below the total even after rounding: some cdf entry
    # exceeds it, and the first that does follows a step up, so a token with
    # probability 0 is never drawn.
    target = u[:, None] * total  # (n, 1)
    no_mass = ~(torch.isfinite(total[:, 0]) & (total[:, 0] > 0))
    return torch.searchsorted(cdf, target, right=True)[:, 0], no_mass


def _with_logprobs(
    logits: torch.Tensor, rows: list[SamplingRow], ids: list[int], errors: list[str | None]
) -> list[SampledToken]:
    out = [SampledToken(token_id=t, error=e) for t, e in zip(ids, errors, strict=True)]
    # A failed row gets no logprobs: its distribution is what failed.
    idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None and errors[i] is None]
    if not idx:
        return out
    logprobs = logits[idx].float().log_softmax(dim=-1)  # (m, V), raw distribution
    logprobs.clamp_(min=LOGPROB_FLOOR)  # -inf -> the floor; rows here hold no NaN
    chosen = torch.tensor([ids[i] for i in idx], device=logits.device)[:, None]
    chosen_lp: list[float] = logprobs.gather(1, chosen)[:, 0].tolist()
    n_top = min(max(rows[i].params.logprobs or 0 for i in idx), logprobs.shape[1])
    top_lp: list[list[float]] = [[] for _ in idx]
    top_ids: list[list[int]] = [[] for _ in idx]
    if n_top > 0:
        top = logprobs.topk(n_top, dim=-1)  # sorted, most likely first
        top_lp, top_ids = top.values.tolist(), top.indices.tolist()
    for j, i in enumerate(idx):
        n = rows[i].params.logprobs or 0
        out[i].logprob = chosen_lp[j]
        out[i].top_logprobs = list(zip(top_ids[j][:n], top_lp[j][:n], strict=True))
    return out
