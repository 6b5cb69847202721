"""A request as the router sees it: tokens so far, text, where it runs, lifetime events.

The router owns the text: it detokenizes the token stream (stop strings included) and
is the only place that knows everything a request has produced, which is what lets a
migrated request continue elsewhere with prompt + tokens so far.

One task owns each request (router/lifecycle.py); other parts only record what they
saw: the stream consumer appends tokens and ends the current attempt
(``end_attempt``), the edge reads the queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
import uuid
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams
from messages import TokenLogprobs


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Delta:
    """New tokens and the text they complete (text may lag tokens at UTF-8/stop edges)."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass
class Final:
    """The last stream item: why it ended, usage, and the error message if it failed."""

    finish_reason: str  # stop | length | abort | error
    usage: Usage
    text: str = ""  # any text released at the end (held back for stop strings)
    error: str | None = None


@dataclass
class Events:
    """Lifetime timestamps (time.monotonic); metrics derive from them."""

    arrival: float = field(default_factory=time.monotonic)
    prefill_sent: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
    queue_seconds: float = 0.0
    prefill_seconds: float = 0.0
    transfer_seconds: float = 0.0  # prefill side: gathering and handing over the KV
    import_seconds: float = 0.0  # decode side: fetch + scatter + join, seen by the router
    transfer_bytes: int = 0
    migrations: int = 0


class Phase(enum.Enum):
    """Where a request is in its lifecycle (the router's view)."""

    ADMITTED = "admitted"
    RESERVING = "reserving"  # asking a decode worker for KV blocks
    PREFILLING = "prefilling"
    STARTING = "starting"  # the decode worker imports the KV
    DECODING = "decoding"
    REPLACING = "replacing"  # its worker died or preempted it: placed again
    FINISHED = "finished"


class AttemptEnd(enum.Enum):
    """Why a placement attempt on a worker ended (see RouterRequest.end_attempt)."""

    FINISHED = "finished"  # the worker ended it (stop, length, abort): it freed the KV
    STOPPED_HERE = "stopped_here"  # a stop string matched here: the worker still holds it
    MIGRATED = "migrated"  # the worker preempted it and freed its KV: place it again


class RouterRequest:
    def __init__(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
        detok: IncrementalDetokenizer | None, deadline: float, stream_interval: int = 1,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.detok = detok
        self.generated: list[int] = []
        self.cached_tokens = 0
        self.worker: str | None = None  # decode/colocated worker holding it now
        self.prefill_worker: str | None = None  # while a prefill is in flight
        self.deadline = deadline  # loop time; every wait, and the request, ends by then
        self.placements = 0  # placement attempts (retries and migrations): numbers attempt_id
        # Clients may reuse a request id once its call is over (a retry after a cancel or
        # a deadline), but workers refuse every id they were told to abort: the ids the
        # workers see carry a key of this call's own, so no two calls ever share one.
        self.call_key = uuid.uuid4().hex[:12]
        self.phase = Phase.ADMITTED
        self.events = Events()
        self.queue: asyncio.Queue[Delta | Final | BaseException] = asyncio.Queue()
        # --stream-interval: tokens after the first are held here until there are this
        # many, so the edge's task wakes (and writes) once per N tokens, not per token.
        self.stream_interval = stream_interval
        self._held: Delta | None = None
        self.done = False
        self.finish_reason: str | None = None  # stop | length | abort | error, once done
        self.task: asyncio.Task[None] | None = None
        self._attempt: asyncio.Future[AttemptEnd] | None = None

    @property
    def attempt_id(self) -> str:
        """The request's id on the workers for the current attempt: unique to this call
        and attempt, whatever ids the client reuses."""
        return f"{self.request_id}@{self.call_key}.{self.placements}"

    def remaining_s(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    def age_s(self) -> float:
        """Seconds since the request arrived: workers keep a re-placed request's age,
        so it does not become the youngest, first preempted, request on its new one."""
        return time.monotonic() - self.events.arrival

    def next_chunk(self) -> tuple[list[int], SamplingParams]:
        """Prompt + tokens so far, and what is left to generate (after a migration): the
        tokens so far count as output for the penalties (resumed_output_tokens)."""
        params = dataclasses.replace(self.params, max_tokens=self.remaining_tokens,
                                     resumed_output_tokens=len(self.generated))
        return self.prompt_token_ids + self.generated, params

    # -- attempts: one placement on a worker at a time --------------------------------------
    def begin_attempt(self) -> asyncio.Future[AttemptEnd]:
        self._attempt = asyncio.get_running_loop().create_future()
        return self._attempt

    def end_attempt(self, why: AttemptEnd) -> None:
        if self._attempt is not None and not self._attempt.done():
            self._attempt.set_result(why)

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_tokens - len(self.generated)

    def usage(self) -> Usage:
        return Usage(len(self.prompt_token_ids), len(self.generated), self.cached_tokens)

    def add_tokens(self, token_ids: list[int], logprobs: list[TokenLogprobs]) -> bool:
        """Record tokens and emit their text; returns True if a stop string matched."""
        now = time.monotonic()
        if self.events.first_token is None:
            self.events.first_token = now
        self.events.last_token = now
        text, stopped, taken = "", False, 0
        for tok in token_ids:
            self.generated.append(tok)
            taken += 1
            if self.detok is not None:
                step = self.detok.add_token(tok)
                text += step.delta
                if step.stopped:
                    stopped = True
                    break
        first = len(self.generated) == taken
        self._emit(Delta(token_ids[:taken], text, logprobs[:taken]), first, last=stopped)
        return stopped

    def _emit(self, delta: Delta, first: bool, last: bool) -> None:
        """Queue ``delta`` for the edge -- at once if it holds the first token (TTFT) or
        the last, else held with the tokens before it until they fill the interval."""
        if self._held is not None:
            held = self._held
            delta = Delta(held.token_ids + delta.token_ids, held.text + delta.text,
                          held.logprobs + delta.logprobs)
            self._held = None
        if first or last or len(delta.token_ids) >= self.stream_interval:
            self.queue.put_nowait(delta)
        else:
            self._held = delta

    def _release_held(self) -> None:
        """Nothing is held past the end: held tokens go out before the Final or error."""
        if self._held is not None:
            self.queue.put_nowait(self._held)
            self._held = None

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.finish_reason = reason
        self.phase = Phase.FINISHED
        self.events.finished = time.monotonic()
        tail = self.detok.flush() if self.detok is not None and reason != "error" else ""
        self._release_held()
        self.queue.put_nowait(Final(reason, self.usage(), tail, error))

    def fail(self, err: BaseException) -> None:
        """End the stream with an error the edge maps to a status code."""
        if self.done:
            return
        self.done = True
        self.finish_reason = "error"
        self.phase = Phase.FINISHED
        self.events.finished = time.monotonic()
        self._release_held()
        self.queue.put_nowait(err)
