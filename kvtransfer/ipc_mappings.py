"""The decode caches a prefill worker has opened through CUDA IPC, and when to close them.

Opening a decode worker's cache maps its whole allocation into this process; the
mapping keeps that GPU memory alive even after the decode worker is gone. So:

- a mapping is keyed by worker id *and* IPC handle: a replaced worker (same id, new
  cache) gets a new mapping and the old one is closed at once;
- a mapping unused for ``idle_close_s`` is closed (a dead decode worker sends no more
  requests our way; a live one that is idle is reopened in a few milliseconds).

Torch-free; ``open_fn`` / ``close_fn`` do the CUDA work, so the bookkeeping is tested
with fakes on CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Mapping(Generic[T]):
    handle: bytes
    value: T  # what open_fn returned (the remote cache as a tensor, and its pointer)
    last_used: float


class IpcMappings(Generic[T]):
    def __init__(self, open_fn: Callable[[Any], T], close_fn: Callable[[T], None],
                 idle_close_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._open, self._close = open_fn, close_fn
        self.idle_close_s = idle_close_s
        self._clock = clock
        self._maps: dict[str, _Mapping[T]] = {}

    def get(self, worker_id: str, handle: bytes, address: Any) -> T:
        """The mapping of ``worker_id``'s cache (``handle``), opened on first use."""
        now = self._clock()
        self.close_idle(now, keep=worker_id)
        m = self._maps.get(worker_id)
        if m is not None and m.handle != handle:  # the worker was replaced
            self._drop(worker_id)
            m = None
        if m is None:
            m = _Mapping(handle, self._open(address), now)
            self._maps[worker_id] = m
        m.last_used = now
        return m.value

    def close_idle(self, now: float | None = None, keep: str | None = None) -> list[str]:
        """Close mappings unused for idle_close_s (except ``keep``); their worker ids."""
        now = self._clock() if now is None else now
        idle = [w for w, m in self._maps.items()
                if w != keep and now - m.last_used > self.idle_close_s]
        for w in idle:
            self._drop(w)
        return idle

    def close_all(self) -> None:
        for w in list(self._maps):
            self._drop(w)

    def __contains__(self, worker_id: str) -> bool:
        return worker_id in self._maps

    def _drop(self, worker_id: str) -> None:
        m = self._maps.pop(worker_id)
        self._close(m.value)
