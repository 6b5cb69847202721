"""Log-probabilities of one sampled token (torch-free: they travel to the router)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TokenLogprobs:
    """``logprob`` of the sampled token under the raw distribution, and the ``top``
    alternatives as (token id, logprob), most likely first."""

    logprob: float
    top: list[tuple[int, float]]
