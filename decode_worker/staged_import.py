"""KV imports off the decode step's critical path: staged, then scattered in slices.

A 1500-token prompt's KV is ~69 MB in fp32. Scattered into the reservation in one
command between two engine steps, it held up every running stream for as long as the
copy took (and one more step for the join). Instead:

    fetch     on the actor's event loop (DecodeWorker.start awaits the transfer while
              the engine keeps stepping)
    stage     the fetched buffer joins this queue (``add``, any thread)
    scatter   between two engine steps (EngineLoop's ``between_steps`` hook), one slice
              of at most ``share`` of a step's time: the blocks per slice follow the
              measured step time and copy rate. With nothing running, nobody waits:
              the whole import goes at once
    join      once its last block landed: ``LLMEngine.start_prefilled``, then the
              waiting ``start`` call returns

Everything that touches the engine (slices, join, the abort check) runs on the engine
thread, so an abort -- a command on that thread -- can never interleave with a slice.
Block ownership does not change while staged: the blocks stay the reservation's (the
engine's request, outside the scheduler) until the join; a request aborted meanwhile
has had them freed by ``LLMEngine.abort`` and its staged import is dropped before the
next slice, its ``start`` answered with None.

The slices go through ``LLMEngine.import_kv`` (kernels.scatter_blocks), the same call
a whole import made: whatever a backend's staging buffer holds per block, a slice is
a run of whole blocks of it.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput

# A slice may cost this share of an engine step (the time streams wait for it).
SLICE_SHARE = 0.2
MIN_SLICE_BLOCKS = 1
EMA = 0.2  # weight of the newest measurement of step time and copy rate

JoinFn = Callable[[LLMEngine], RequestOutput | None]


@dataclass
class StagedImport:
    request_id: str
    block_ids: list[int]
    staging: torch.Tensor  # (len(block_ids), *block_shape)
    join: JoinFn  # on the engine thread once every block landed
    done: Future[RequestOutput | bool | None] = field(default_factory=Future)
    landed: int = 0  # blocks scattered so far


class StagedImports:
    """The decode worker's queue of fetched KV waiting to be scattered. ``pending`` and
    ``run`` are EngineLoop's between-steps hook; ``add`` may be called from any thread.

    ``done`` of an import resolves to the join's result (a finished output or None),
    or to False when the request was aborted before it joined."""

    def __init__(self, share: float = SLICE_SHARE) -> None:
        self.share = share
        self._queue: collections.deque[StagedImport] = collections.deque()
        self._lock = threading.Lock()
        self._step_s: float | None = None  # engine step time, EMA
        self._bytes_per_s: float | None = None  # scatter rate, EMA
        self._last_end: float | None = None  # when the previous slice ended
        self.slices = 0  # slices scattered so far (tests and stats read it)

    def add(self, imp: StagedImport) -> Future[RequestOutput | bool | None]:
        with self._lock:
            self._queue.append(imp)
        return imp.done

    def pending(self) -> bool:
        return bool(self._queue)

    def run(self, engine: LLMEngine) -> None:
        """One slice (engine thread, between steps): scatter the head import's next
        blocks; join it when they were its last."""
        now = time.perf_counter()
        busy = engine.has_unfinished()
        if self._last_end is not None and busy:
            # The time since the last slice is about one step: what a slice is sized by.
            self._step_s = _ema(self._step_s, now - self._last_end)
        with self._lock:
            imp = self._queue[0] if self._queue else None
        if imp is None:
            return
        if not engine.has_request(imp.request_id):  # aborted: its blocks are freed
            self._pop(imp, False)
            return
        n_left = len(imp.block_ids) - imp.landed
        n = min(n_left, self._slice_blocks(imp)) if busy and n_left else n_left
        if n > 0:
            t0 = time.perf_counter()
            lo = imp.landed
            try:
                engine.import_kv(imp.block_ids[lo:lo + n], imp.staging[lo:lo + n])
            except BaseException as e:
                self._fail(imp, e)
                return
            dt = time.perf_counter() - t0
            nbytes = n * imp.staging[0].numel() * imp.staging.element_size()
            if dt > 0:
                self._bytes_per_s = _ema(self._bytes_per_s, nbytes / dt)
            imp.landed += n
            self.slices += 1
        self._last_end = time.perf_counter()
        if imp.landed == len(imp.block_ids):
            try:
                result = imp.join(engine)
            except BaseException as e:
                self._fail(imp, e)
                return
            self._pop(imp, result)

    def _slice_blocks(self, imp: StagedImport) -> int:
        """Blocks that fit ``share`` of a step at the measured copy rate (the first
        slice, unmeasured, is one block)."""
        if self._step_s is None or self._bytes_per_s is None:
            return MIN_SLICE_BLOCKS
        block_bytes = imp.staging[0].numel() * imp.staging.element_size()
        budget = self.share * self._step_s * self._bytes_per_s
        return max(MIN_SLICE_BLOCKS, int(budget // max(block_bytes, 1)))

    def _pop(self, imp: StagedImport, result: RequestOutput | bool | None) -> None:
        self._remove(imp)
        if imp.done.set_running_or_notify_cancel():
            imp.done.set_result(result)

    def _fail(self, imp: StagedImport, err: BaseException) -> None:
        self._remove(imp)
        if imp.done.set_running_or_notify_cancel():
            imp.done.set_exception(err)

    def _remove(self, imp: StagedImport) -> None:
        with self._lock:
            if self._queue and self._queue[0] is imp:
                self._queue.popleft()
            if not self._queue:  # the next import's first gap is no step time
                self._last_end = None
        imp.staging = torch.empty(0)  # let the transfer's buffer go now


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new
