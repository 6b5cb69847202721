"""What one scheduler step decided: the chunks to compute and who was preempted."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import Request


@dataclass
class ScheduledChunk:
    request: Request
    start: int  # request.num_computed_tokens when scheduled
    num_tokens: int  # tokens computed this step: token_ids[start : start + num_tokens]
    samples: bool  # the chunk reaches the end of the known tokens, so a token is sampled

    @classmethod
    def of(cls, req: Request, n: int) -> ScheduledChunk:
        start = req.num_computed_tokens
        return cls(req, start, n, start + n == req.num_tokens)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks
