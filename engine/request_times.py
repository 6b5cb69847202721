"""A request's lifetime events inside one engine: the one timestamp record the engine
keeps (outputs carry a snapshot of it; the router keeps its own view of the whole
request, across workers, in router/request_state.py's Events)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RequestTimes:
    """Lifetime events (time.monotonic seconds); every latency metric derives from these."""

    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None
