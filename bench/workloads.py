"""Seeded serving workloads: what each request asks for, and when it arrives.

A workload is a list of RequestSpec sorted by arrival offset. Arrivals are open-loop:
the schedule is fixed before the run, so a slow server cannot slow the offered load
(closed-loop clients hide queueing, which is what an SLO benchmark must see).

Length distributions (all seeded with ``seed``; token-id prompts draw ids uniformly from
[FIRST_PLAIN_ID, vocab_size) so no special token lands in them):

    chat          Poisson(rate); a short user message (one of 32 topics, 10-30 tokens
                  after the chat template); max_tokens uniform in [16, 128].
    long-prompt   Poisson(rate); token-id prompts uniform in [1024, 4096] tokens;
                  max_tokens uniform in [8, 32] (summarization-like).
    interference  steady decode streams: Poisson(rate), 64-token token-id prompts,
                  max_tokens 96; plus bursts of BURST_SIZE long prompts (uniform in
                  [1024, 2048] tokens, max_tokens 8) every BURST_PERIOD_S seconds from
                  BURST_PERIOD_S / 2 on. ``bursts=False`` keeps the same streams and
                  drops the bursts (the no-interference baseline).
    shared-prefix Poisson(rate); one common 1024-token system prefix (token ids) plus a
                  unique 32-token suffix; max_tokens 32.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

FIRST_PLAIN_ID = 100  # SmolLM2's special tokens sit below this
TOPICS = (
    "the water cycle", "black holes", "the French revolution", "how vaccines work",
    "compound interest", "the history of jazz", "photosynthesis", "machine learning",
    "the Roman empire", "plate tectonics", "how a CPU works", "the stock market",
    "climate change", "the human heart", "quantum computing", "the printing press",
    "volcanoes", "the internet", "DNA", "renewable energy", "the moon landing",
    "coffee brewing", "chess openings", "the Olympic games", "honey bees",
    "electric cars", "the Great Wall of China", "sleep", "origami", "rainbows",
    "the violin", "tea ceremonies",
)
WORKLOADS = ("chat", "long-prompt", "interference", "shared-prefix")
BURST_SIZE = 2
BURST_PERIOD_S = 25.0
STREAM_PROMPT_TOKENS = 64
STREAM_MAX_TOKENS = 96
SHARED_PREFIX_TOKENS = 1024
SHARED_SUFFIX_TOKENS = 32


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload.

    arrival_s: seconds after the run starts at which the request is sent.
    kind: its class ("chat", "long", "stream", "burst", "shared"); SLOs and plots
        group by it.
    prompt_ids / chat_text: exactly one is set (token ids, or a user message that the
        server wraps in the model's chat template).
    """

    index: int
    arrival_s: float
    kind: str
    max_tokens: int
    prompt_ids: tuple[int, ...] | None = None
    chat_text: str | None = None

    @property
    def nominal_prompt_tokens(self) -> int:
        """Prompt length before any chat template (the server reports the exact one)."""
        return len(self.prompt_ids) if self.prompt_ids is not None else 0


def poisson_arrivals(rng: random.Random, rate: float, duration_s: float,
                     max_requests: int) -> list[float]:
    """Arrival offsets of a Poisson process of ``rate`` per second, cut at the duration
    or the count, whichever comes first."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    out: list[float] = []
    t = rng.expovariate(rate)
    while t < duration_s and len(out) < max_requests:
        out.append(t)
        t += rng.expovariate(rate)
    return out


def _ids(rng: random.Random, n: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(rng.randrange(FIRST_PLAIN_ID, vocab_size) for _ in range(n))


def chat(rate: float, duration_s: float, max_requests: int, vocab_size: int,
         seed: int = 0) -> list[RequestSpec]:
    rng = random.Random(seed)
    return [RequestSpec(i, t, "chat", rng.randint(16, 128),
                        chat_text=f"Tell me about {rng.choice(TOPICS)}.")
            for i, t in enumerate(poisson_arrivals(rng, rate, duration_s, max_requests))]


def long_prompt(rate: float, duration_s: float, max_requests: int, vocab_size: int,
                seed: int = 0, min_tokens: int = 1024, max_tokens: int = 4096
                ) -> list[RequestSpec]:
    rng = random.Random(seed)
    return [RequestSpec(i, t, "long", rng.randint(8, 32),
                        prompt_ids=_ids(rng, rng.randint(min_tokens, max_tokens), vocab_size))
            for i, t in enumerate(poisson_arrivals(rng, rate, duration_s, max_requests))]


def interference(rate: float, duration_s: float, max_requests: int, vocab_size: int,
                 seed: int = 0, bursts: bool = True, salt: int = 0) -> list[RequestSpec]:
    """Streams and bursts come from separate generators, so the streams of the run with
    bursts and of the baseline without arrive at the same times with the same lengths.
    ``salt`` changes only the prompts' token ids: runs against one server must not hit
    each other's prefix cache (a repeated burst prompt would cost nothing to prefill)."""
    stream_rng, burst_rng = random.Random(seed), random.Random(seed + 1)
    ids_rng = random.Random(f"{seed}/{salt}")
    specs = [RequestSpec(0, t, "stream", STREAM_MAX_TOKENS,
                         prompt_ids=_ids(ids_rng, STREAM_PROMPT_TOKENS, vocab_size))
             for t in poisson_arrivals(stream_rng, rate, duration_s, max_requests)]
    if bursts:
        for k in range(math.ceil((duration_s - BURST_PERIOD_S / 2) / BURST_PERIOD_S)):
            t = BURST_PERIOD_S / 2 + k * BURST_PERIOD_S
            specs += [RequestSpec(0, t, "burst", 8,
                                  prompt_ids=_ids(ids_rng, burst_rng.randint(1024, 2048),
                                                  vocab_size))
                      for _ in range(BURST_SIZE)]
    specs.sort(key=lambda s: s.arrival_s)
    return [RequestSpec(i, s.arrival_s, s.kind, s.max_tokens, s.prompt_ids)
            for i, s in enumerate(specs)]


def burst_times(specs: list[RequestSpec]) -> list[float]:
    return sorted({s.arrival_s for s in specs if s.kind == "burst"})


def shared_prefix(rate: float, duration_s: float, max_requests: int, vocab_size: int,
                  seed: int = 0) -> list[RequestSpec]:
    rng = random.Random(seed)
    prefix = _ids(rng, SHARED_PREFIX_TOKENS, vocab_size)
    return [RequestSpec(i, t, "shared", 32,
                        prompt_ids=prefix + _ids(rng, SHARED_SUFFIX_TOKENS, vocab_size))
            for i, t in enumerate(poisson_arrivals(rng, rate, duration_s, max_requests))]


def build(name: str, rate: float, duration_s: float, max_requests: int, vocab_size: int,
          seed: int = 0, salt: int = 0) -> list[RequestSpec]:
    """The named workload (``interference-nobursts`` is the baseline without bursts).
    ``salt`` (interference only) varies the prompts' token ids, not the schedule."""
    if name == "chat":
        return chat(rate, duration_s, max_requests, vocab_size, seed)
    if name == "long-prompt":
        return long_prompt(rate, duration_s, max_requests, vocab_size, seed)
    if name in ("interference", "interference-nobursts"):
        return interference(rate, duration_s, max_requests, vocab_size, seed,
                            bursts=name == "interference", salt=salt)
    if name == "shared-prefix":
        return shared_prefix(rate, duration_s, max_requests, vocab_size, seed)
    raise ValueError(f"unknown workload {name!r}; one of {', '.join(WORKLOADS)}")
