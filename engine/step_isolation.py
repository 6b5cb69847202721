"""Run one step's forward pass so that a request that breaks it fails alone.

A forward pass (model + sampler) that raises is retried on halves of the batch, then
on halves of the half that still fails, down to single chunks::

    [a b c d]  raises
    [a b] ok   [c d] raises
               [c] ok   [d] raises  -> d fails with the error; a, b, c have their tokens

Why retrying is sound: a chunk's forward writes only its own request's KV slots for
positions [start, start + n), computed from the request's tokens and its earlier KV,
which no attempt changes; a retry rewrites the same slots. Random draws are the other
state an attempt touches: every attempt starts from a checkpoint of the generators it
may draw from, restored when it fails, so a retried seeded request draws exactly what
it would have in the first attempt. With one culprit in n chunks this costs about
2 log2(n) extra passes, paid only when a step fails. A failure that is not any one
request's (the device is gone) fails every chunk of the step, as before, but each with
an error outcome rather than an exception out of the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from engine.sampler import SampledToken

log = logging.getLogger(__name__)

RunChunks = Callable[[list[int]], list[SampledToken]]  # chunk indices -> sampled tokens
Checkpoint = Callable[[list[int]], Callable[[], None]]  # chunk indices -> restore()


@dataclass
class ChunkResult:
    """The outcome of one scheduled chunk: its token (None when the chunk does not
    sample) or the error that failed its request."""

    token: SampledToken | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


def run_isolated(
    samples: Sequence[bool], run: RunChunks, checkpoint: Checkpoint
) -> list[ChunkResult]:
    """Run every chunk, bisecting on failure; one result per chunk, in order.

    ``samples[i]``: chunk i yields a token. ``run(indices)`` runs those chunks in one
    forward pass and returns the tokens of the sampling ones, in order.
    ``checkpoint(indices)`` saves the state an attempt on them may change and returns
    the function that restores it.
    """
    results = [ChunkResult() for _ in samples]
    pending = [list(range(len(samples)))]
    while pending:
        idx = pending.pop()
        restore = checkpoint(idx)
        try:
            tokens = run(idx)
        except Exception as e:
            restore()
            if len(idx) == 1:
                log.warning("chunk %d failed on its own: %r", idx[0], e, exc_info=True)
                results[idx[0]].error = f"{type(e).__name__}: {e}"
            else:
                log.warning("a step of %d chunks failed (%r); retrying in halves",
                            len(idx), e)
                mid = len(idx) // 2
                pending += [idx[mid:], idx[:mid]]  # the first half runs first
            continue
        sampling = [i for i in idx if samples[i]]
        if len(tokens) != len(sampling):  # a bug in the runner, not in a request
            raise RuntimeError(f"{len(tokens)} tokens for {len(sampling)} sampling chunks")
        for i, tok in zip(sampling, tokens, strict=True):
            results[i].token = tok
    return results
