"""A request's life in the router: one task per request places it, and places it again.

    drive(rr)      while the request is not done: one attempt
    attempt        disaggregated: reserve blocks on decode worker D -> prefill on P (the
                   KV goes to D) -> first token to the client -> D.start(handle) -> wait
                   until D ends the attempt (router/streams.py)
                   colocated: the whole request to one worker -> wait likewise
    attempt ends   finished (the worker ended it)       -> done
                   a stop string matched here           -> abort on D, done
                   migrated (D preempted it) / a worker
                   it used died / its KV transfer failed -> the next attempt, with prompt
                                                          + tokens so far, elsewhere
    cleanup        whatever ends an attempt early -- cancel (client gone), deadline, an
                   error -- every worker the attempt *sent* something to is told to abort
                   it, even if the reply never came; workers refuse late calls for an
                   aborted id, so no KV block outlives the request.

Each attempt has its own id on the workers (``attempt_id``: the request id, a key of
the call's own and the attempt's number), so whatever a worker still says about an
earlier attempt is stale by construction, and a worker's memory of aborted ids never
refuses a later attempt, nor a later call that reuses the client's request id.

Failed attempts are bounded (MAX_PLACEMENTS; preemptions are not failures, the deadline
bounds those) and every wait races the workers' lifelines and ends by the request's
deadline, as does the request itself, decoding included (_attempt_by_deadline), so
nothing waits on a dead worker and nothing runs past its deadline.
"""

from __future__ import annotations

import asyncio
import logging

import ray

from engine.errors import InvalidRequestError
from engine.sampling_params import SamplingParams, SamplingParamsError
from messages import KVTransferError, PrefillAborted, PrefillResult, PrefillTask
from router.config import RouterConfig
from router.errors import (
    DeadlineExceeded,
    RequestFailedError,
    RouterError,
    TransferFailed,
    WorkerLost,
)
from router.placement import Placement
from router.request_state import AttemptEnd, Phase, RouterRequest
from router.worker_handle import WorkerHandle, cause, one_line

log = logging.getLogger(__name__)
# Failed attempts of one request (its worker died, its KV transfer failed) before it
# fails. Preemptions do not count: they are load, not failure, and the deadline bounds
# them (a request preempted again and again under KV pressure must not end INTERNAL).
MAX_PLACEMENTS = 8
DEADLINE_SLACK_S = 0.25  # past the deadline, before an attempt is cut off (see below)


class Lifecycle:
    def __init__(self, config: RouterConfig, placement: Placement) -> None:
        self.config = config
        self.placement = placement
        self.attempts: dict[str, RouterRequest] = {}  # attempt id -> request, while on
        self._cleanups: set[asyncio.Task[None]] = set()

    async def drive(self, rr: RouterRequest) -> None:
        """The request's owner task: runs until it is done, failed or cancelled."""
        last: Exception | None = None  # why the latest attempt had to be retried
        failed = 0  # attempts that failed (MAX_PLACEMENTS bounds them)
        try:
            while not rr.done:
                if failed >= MAX_PLACEMENTS:
                    log.warning("request %s: %d attempts failed, giving up; the last: %s",
                                rr.request_id, failed, last)
                    raise RequestFailedError(
                        f"request {rr.request_id} could not be placed after "
                        f"{MAX_PLACEMENTS} attempts; the last: {last}")
                rr.placements += 1
                aid = rr.attempt_id
                touched: set[WorkerHandle] = set()
                self.attempts[aid] = rr
                try:
                    end = await self._attempt_by_deadline(rr, touched)
                except (WorkerLost, TransferFailed) as e:
                    log.info("request %s: %s; placing it again", rr.request_id, e)
                    last = e
                    failed += 1
                    if rr.phase in (Phase.STARTING, Phase.DECODING):  # it had a decode
                        rr.events.migrations += 1  # worker, and moves to another
                    rr.phase = Phase.REPLACING
                    self._abort_on(aid, touched)
                    continue
                except BaseException:
                    self._abort_on(aid, touched)
                    raise
                finally:
                    del self.attempts[aid]
                if end is AttemptEnd.MIGRATED:
                    rr.events.migrations += 1
                    rr.phase = Phase.REPLACING
                elif end is AttemptEnd.STOPPED_HERE:
                    self._abort_on(aid, touched)
        except asyncio.CancelledError:
            raise
        except (RouterError, InvalidRequestError, SamplingParamsError, TimeoutError) as e:
            rr.fail(e)
        except Exception as e:
            log.exception("request %s failed", rr.request_id)
            # One line for the client: a worker's error comes with its remote traceback
            # (pids, addresses, paths), which belongs in the log, not in the answer.
            why = cause(e) if isinstance(e, ray.exceptions.RayTaskError) else one_line(e)
            rr.fail(RequestFailedError(f"request {rr.request_id} failed: {why}"))

    async def _attempt_by_deadline(self, rr: RouterRequest, touched: set[WorkerHandle]
                                   ) -> AttemptEnd:
        """The attempt, ended (cancelled, and DeadlineExceeded raised) at the request's
        deadline: every wait inside ends by it, and so does decoding itself, or an HTTP
        request (which has no client deadline) would run until max_tokens whatever
        --request-timeout-s says."""
        try:
            # A moment's slack: a wait inside that runs out at the deadline says what it
            # waited for (KV room, a worker) better than this can.
            return await asyncio.wait_for(self._attempt(rr, touched),
                                          rr.remaining_s() + DEADLINE_SLACK_S)
        except TimeoutError as e:
            if type(e) is not TimeoutError:  # a wait inside ran out first, and said so
                raise
            raise DeadlineExceeded(
                f"request {rr.request_id} reached its deadline while {rr.phase.value} "
                f"({len(rr.generated)} tokens generated)") from None

    async def _attempt(self, rr: RouterRequest, touched: set[WorkerHandle]) -> AttemptEnd:
        if self.config.mode == "colocated":
            return await self._attempt_colocated(rr, touched)
        return await self._attempt_disaggregated(rr, touched)

    async def _attempt_disaggregated(self, rr: RouterRequest, touched: set[WorkerHandle]
                                     ) -> AttemptEnd:
        tokens, params = rr.next_chunk()
        rr.phase = Phase.RESERVING
        d, blocks = await self.placement.reserve(rr, tokens, params, touched)
        res = await self._prefill(rr, tokens, params, d, blocks, touched)
        if rr.events.migrations == 0 and not rr.generated:
            rr.cached_tokens = res.num_cached_tokens
        stopped = rr.add_tokens([res.first_token], [res.logprobs] if res.logprobs else [])
        if stopped or res.finish_reason is not None:
            rr.finish("stop" if stopped else res.finish_reason or "stop")
            return AttemptEnd.STOPPED_HERE  # D still holds the reservation
        rr.phase = Phase.STARTING
        ended = rr.begin_attempt()
        rr.worker = d.worker_id
        d.requests.add(rr.request_id)
        try:
            t0 = asyncio.get_running_loop().time()
            await d.start(rr.attempt_id, res, rr.cached_tokens)
            rr.events.import_seconds += asyncio.get_running_loop().time() - t0
            rr.phase = Phase.DECODING
            return await d.call(ended)
        finally:
            d.requests.discard(rr.request_id)
            rr.worker = None

    async def _prefill(self, rr: RouterRequest, tokens: list[int], params: SamplingParams,
                       d: WorkerHandle, blocks: list[int], touched: set[WorkerHandle]
                       ) -> PrefillResult:
        rr.phase = Phase.PREFILLING
        p, hashes = await self.placement.prefill_worker(rr, tokens)
        assert p.load is not None and d.endpoint is not None
        if rr.events.prefill_sent is None:
            rr.events.prefill_sent = asyncio.get_running_loop().time()
        task = PrefillTask(rr.attempt_id, tokens, params, d.endpoint, blocks)
        p.load.outstanding_tokens += len(tokens)
        p.requests.add(rr.request_id)
        touched.add(p)
        try:
            res = await p.prefill(task, d)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, PrefillAborted):  # not by us: e.g. the worker drains
                raise TransferFailed(f"prefill on {p.worker_id} was aborted") from None
            if isinstance(e.cause, KVTransferError):  # the send failed: a transfer failure
                raise TransferFailed(f"KV send from {p.worker_id} failed: {cause(e)}"
                                     ) from None
            raise RequestFailedError(f"prefill failed: {cause(e)}") from None
        finally:
            p.load.outstanding_tokens -= len(tokens)
            p.requests.discard(rr.request_id)
        touched.discard(p)  # it released its blocks (kept as prefix cache)
        p.load.remember(hashes)
        ev = rr.events
        ev.queue_seconds += res.queue_seconds
        ev.prefill_seconds += res.prefill_seconds
        ev.transfer_seconds += res.transfer_seconds
        ev.transfer_bytes += res.handle.nbytes if res.handle else 0
        return res

    async def _attempt_colocated(self, rr: RouterRequest, touched: set[WorkerHandle]
                                 ) -> AttemptEnd:
        tokens, params = rr.next_chunk()
        w = await self.placement.colocated_worker(rr)
        ended = rr.begin_attempt()
        rr.worker = w.worker_id
        w.requests.add(rr.request_id)
        touched.add(w)
        try:
            rr.phase = Phase.DECODING
            try:
                await w.generate(rr.attempt_id, tokens, params, rr.age_s())
            except ray.exceptions.RayTaskError as e:
                raise RequestFailedError(f"generate failed: {cause(e)}") from None
            end = await w.call(ended)
            if end is AttemptEnd.FINISHED or end is AttemptEnd.MIGRATED:
                touched.discard(w)
            return end
        finally:
            w.requests.discard(rr.request_id)
            rr.worker = None

    # -- cleanup -------------------------------------------------------------------------
    def _abort_on(self, request_id: str, workers: set[WorkerHandle]) -> None:
        """Tell every worker that may hold something of the request to drop it. Runs as
        its own task: a cancelled request must still clean up.

        Prefill workers first, and the rest only once they answered: a prefill worker
        answers an abort after its KV send is over, so a decode worker never frees (and
        hands to someone else) reserved blocks that a send (cuda-ipc writes in place)
        may still be writing."""
        first = [h for h in workers if h.role == "prefill"]
        then = [h for h in workers if h.role != "prefill"]
        workers.clear()

        async def abort_all() -> None:
            await asyncio.gather(*(h.abort(request_id) for h in first))
            await asyncio.gather(*(h.abort(request_id) for h in then))

        t = asyncio.get_running_loop().create_task(abort_all())
        self._cleanups.add(t)
        t.add_done_callback(self._cleanups.discard)

    async def settle(self) -> None:
        """Wait for the aborts in flight (tests audit pools after this; shutdown)--
        including those of requests just ended (Router.abort) whose task has yet to run
        its cleanup: shutdown kills the workers right after, and would otherwise do so
        before the prefill worker was told (its KV send may still be running)."""
        while True:
            ending = [rr.task for rr in self.attempts.values()
                      if rr.done and rr.task is not None]
            if not self._cleanups and not ending:
                return
            await asyncio.gather(*self._cleanups, *ending, return_exceptions=True)
