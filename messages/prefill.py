"""What the router and a prefill worker exchange."""

from __future__ import annotations

from dataclasses import dataclass

from engine.logprobs import TokenLogprobs
from engine.sampling_params import SamplingParams
from messages.transfer import Endpoint, TransferHandle


@dataclass
class PrefillTask:
    """Prefill ``token_ids``, sample the first token, ship the KV to ``dest``'s
    ``dest_block_ids`` (reserved there by the router beforehand)."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    dest: Endpoint
    dest_block_ids: list[int]


@dataclass
class PrefillResult:
    request_id: str
    first_token: int
    logprobs: TokenLogprobs | None
    finish_reason: str | None  # set when the first token already ends the request
    num_cached_tokens: int  # prompt tokens served from this worker's prefix cache
    handle: TransferHandle | None  # None when finished (no KV to ship)
    queue_seconds: float  # arrival at the worker -> first scheduled
    prefill_seconds: float  # first scheduled -> first token
    transfer_seconds: float  # gathering and handing over the KV


class PrefillAborted(RuntimeError):
    """The request was cancelled while it was being prefilled (raised by ``prefill``)."""


class PrefillFailed(RuntimeError):
    """The engine could not compute this request's prefill (it broke its step, alone:
    the other prompts in that step went on). Raised by ``prefill``."""
