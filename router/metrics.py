"""Prometheus metrics of the whole deployment, served by the router (one scrape target).

Where each series comes from:

    request histograms / token counters   RouterRequest.events, when a request ends
                                          (Router.on_finish hook)
    inter-token latency                   the gRPC edge, as each token batch leaves for
                                          the client (what the client experiences)
    requests_total{finish_reason,code}    the gRPC edge, which knows the status code
    worker gauges and counters            WorkerHandle.stats at scrape time: decode and
                                          colocated workers refresh it with every token
                                          batch; StatsPoller polls prefill workers
    workers_lost_total, role_unplaceable  the worker registry (node loss, capacity)

Names follow Prometheus conventions: the ``pdserve_`` prefix, seconds and bytes as
units, ``_total`` on counters. Prefix-cache counters count KV blocks.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.request_state import RouterRequest

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from messages.stats import WorkerStats
    from router.core import Router
    from router.worker_handle import WorkerHandle

log = logging.getLogger(__name__)
PREFIX = "pdserve_"
DEPARTED_WORKER_RETENTION_S = 600.0  # a dead worker reads worker_up 0 this long

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
               120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                 60.0, 120.0)
TRANSFER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0)


def queue_seconds(rr: RouterRequest) -> float:
    """Waiting before compute: for KV room at the router, then in the prefill queue."""
    ev = rr.events
    at_router = (ev.prefill_sent - ev.arrival) if ev.prefill_sent is not None else 0.0
    return max(0.0, at_router) + ev.queue_seconds


def transfer_seconds(rr: RouterRequest) -> float:
    """The KV hand-off, both ends: the prefill worker gathering and sending it, the decode
    worker fetching and scattering it into its blocks."""
    return rr.events.transfer_seconds + rr.events.import_seconds


def observe_many(h: Histogram, value: float, n: int) -> None:
    """``h.observe(value)`` n times, at the cost of one: a bucket found once, one add of
    n to it and of n * value to the sum (prometheus_client's observe has no count; this
    uses its per-bucket counters, falling back to n calls should they ever change)."""
    bounds, buckets, total = (getattr(h, "_upper_bounds", None), getattr(h, "_buckets", None),
                              getattr(h, "_sum", None))
    if bounds is None or buckets is None or total is None:
        for _ in range(n):
            h.observe(value)
        return
    total.inc(value * n)
    buckets[bisect.bisect_left(bounds, value)].inc(n)


class Metrics:
    """Owns a registry (not the global one, so several servers can live in one process)."""

    def __init__(self, router: Router) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Arrival at the router until the first token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive tokens of a request, as sent to the client.",
            buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Arrival at the router until the request ended.", buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram(
            PREFIX + "request_queue_time_seconds",
            "Waiting before compute: for KV room at the router and in the prefill queue.",
            buckets=QUEUE_BUCKETS, registry=r)
        self.transfer = Histogram(
            PREFIX + "kv_transfer_seconds",
            "Moving one request's prompt KV cache from its prefill to its decode worker "
            "(send and import).",
            buckets=TRANSFER_BUCKETS, registry=r)
        self.transfer_bytes = Counter(
            PREFIX + "kv_transfer_bytes", "KV cache bytes moved between workers.", registry=r)
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter(
            PREFIX + "requests", "Requests by how they ended and the gRPC status returned.",
            ["finish_reason", "code"], registry=r)
        for reason in ("stop", "length"):  # present from the start, so rate() has a base
            self.requests.labels(reason, "OK")
        r.register(WorkerCollector(router))
        router.on_finish.append(self.on_finish)
        self._http: WSGIServer | None = None

    # -- recording -------------------------------------------------------------------------
    def on_finish(self, rr: RouterRequest, reason: str) -> None:
        """Router hook, once per request whatever the ending."""
        ev = rr.events
        end = ev.finished or time.monotonic()
        if ev.first_token is not None:
            self.ttft.observe(ev.first_token - ev.arrival)
        self.e2e.observe(end - ev.arrival)
        if ev.first_token is not None or ev.prefill_sent is not None:
            self.queue.observe(queue_seconds(rr))
        if ev.transfer_bytes:
            self.transfer.observe(transfer_seconds(rr))
            self.transfer_bytes.inc(ev.transfer_bytes)
        self.prompt_tokens.inc(len(rr.prompt_token_ids))
        self.generation_tokens.inc(len(rr.generated))

    def observe_tokens(self, num_tokens: int, gap_s: float) -> None:
        """``num_tokens`` arrived ``gap_s`` after the previous ones of the same request.
        Tokens that arrive together share the gap, so the mean stays the per-token time."""
        if num_tokens > 0:
            observe_many(self.itl, gap_s / num_tokens, num_tokens)

    def count_request(self, finish_reason: str, code: str) -> None:
        self.requests.labels(finish_reason, code).inc()

    # -- exporter --------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter (its own thread); returns the bound port."""
        try:
            server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise OSError(f"could not listen on {host}:{port} (metrics): {e.strerror}") from e
        self._http = server
        return int(server.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class WorkerCollector(Collector):
    """Worker series, read from the router's handles at scrape time (the scrape runs in
    the exporter's thread; ``router.workers()`` copies the handle list atomically)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._present: set[tuple[str, str]] = set()  # (worker, role) at the last scrape
        self._departed: dict[tuple[str, str], float] = {}  # -> when it was first missing

    def collect(self) -> Iterator[Metric]:
        labels = ["worker", "role"]
        up = GaugeMetricFamily(PREFIX + "worker_up", "1 while the worker is alive.",
                               labels=labels)
        running = GaugeMetricFamily(PREFIX + "num_requests_running",
                                    "Requests running on the worker.", labels=labels)
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting",
                                    "Requests waiting in the worker's queue.", labels=labels)
        usage = GaugeMetricFamily(PREFIX + "kv_cache_usage_ratio",
                                  "Fraction of the worker's KV cache blocks in use.",
                                  labels=labels)
        queries = CounterMetricFamily(PREFIX + "prefix_cache_queries",
                                      "Prefix cache lookups, in KV blocks.", labels=labels)
        hits = CounterMetricFamily(PREFIX + "prefix_cache_hits",
                                   "Prefix cache hits, in KV blocks.", labels=labels)
        preemptions = CounterMetricFamily(PREFIX + "num_preemptions",
                                          "Requests the worker preempted.", labels=labels)
        owners = GaugeMetricFamily(
            PREFIX + "kv_blocks", "The worker's KV blocks by owner: free, cached (prefix "
            "cache, evictable), running, reserved (awaiting their KV), transfer (being "
            "shipped). They sum to the usable blocks.", labels=[*labels, "owner"])
        pool_bytes = GaugeMetricFamily(
            PREFIX + "kv_pool_bytes", "Bytes of the worker's usable KV pool (blocks x "
            "bytes per block, scales included).", labels=labels)
        spill = SpillFamilies(labels)
        now = time.monotonic()
        seen: set[tuple[str, str]] = set()
        for h in self.router.workers():
            key = (h.worker_id, h.role)
            seen.add(key)
            up.add_metric(key, 1.0 if h.alive else 0.0)
            s = h.stats
            if s is None:
                continue
            running.add_metric(key, s.num_running)
            waiting.add_metric(key, s.num_waiting)
            usage.add_metric(key, s.kv_usage)
            queries.add_metric(key, s.prefix_queries)
            hits.add_metric(key, s.prefix_hits)
            preemptions.add_metric(key, s.num_preemptions)
            pool_bytes.add_metric(key, s.num_usable_blocks * s.engine.kv_block_bytes)
            spill.add(key, s)
            if s.pool is not None:
                for owner, n in dataclasses.asdict(s.pool).items():
                    if owner != "usable":
                        owners.add_metric([*key, owner], n)
        # Replaced workers leave the router's table; keep reporting them as down for a
        # while so dashboards and alerts see the 1 -> 0 edge rather than a vanished series.
        for key in self._present - seen:
            self._departed[key] = now
        self._present = seen
        for key, since in list(self._departed.items()):
            if key in seen or now - since > DEPARTED_WORKER_RETENTION_S:
                del self._departed[key]
            else:
                up.add_metric(key, 0.0)
        yield from (up, running, waiting, usage, queries, hits, preemptions, owners,
                    pool_bytes, *spill.families())
        yield GaugeMetricFamily(PREFIX + "num_requests_in_flight",
                                "Requests admitted by the router and not finished.",
                                value=len(self.router.requests))
        yield GaugeMetricFamily(PREFIX + "num_requests_queued",
                                "Requests waiting at the router for KV room on a decode "
                                "worker.", value=self.router.num_queued)
        lost = CounterMetricFamily(PREFIX + "workers_lost",
                                   "Workers lost, by role and reason: node_lost (their Ray "
                                   "node died), actor_died, or kv_spec_mismatch (refused "
                                   "as it came up: its KV layout differed). Each is "
                                   "replaced.",
                                   labels=["role", "reason"])
        registry = self.router.registry
        for (role, reason), n in sorted(registry.lost.items()):
            lost.add_metric([role, reason], n)
        yield lost
        unplaceable = GaugeMetricFamily(PREFIX + "role_unplaceable",
                                        "1 while no alive Ray node can host a worker the "
                                        "role needs (its calls get UNAVAILABLE).",
                                        labels=["role"])
        for role in self.router.config.roles:
            unplaceable.add_metric([role], 1.0 if role in registry.unplaceable else 0.0)
        yield unplaceable
        yield CounterMetricFamily(PREFIX + "requests_refused",
                                  "Calls refused at admission because the deployment was at "
                                  "its in-flight bound (RESOURCE_EXHAUSTED).",
                                  value=self.router.admission.refused)


class SpillFamilies:
    """The prefix cache's spill tier per worker (engine.kv_spill): hits per tier are
    prefix_cache_hits (the pool) and kv_spill_hits (this tier)."""

    def __init__(self, labels: list[str]) -> None:
        self.hits = CounterMetricFamily(
            PREFIX + "kv_spill_hits", "Prefix cache hits in the spill tier, in KV blocks "
            "(restored into the pool instead of recomputed).", labels=labels)
        self.spilled = CounterMetricFamily(
            PREFIX + "kv_spilled_bytes", "Bytes of evicted prefix blocks copied into the "
            "spill tier (as stored there: int8 on CPU).", labels=labels)
        self.restored = CounterMetricFamily(
            PREFIX + "kv_restored_bytes", "Bytes restored from the spill tier into the "
            "KV pool (as stored there).", labels=labels)
        self.blocks = GaugeMetricFamily(
            PREFIX + "kv_spill_blocks", "KV blocks held in the spill tier.", labels=labels)

    def add(self, key: tuple[str, str], s: WorkerStats) -> None:
        e = s.engine
        if not e.spill_capacity_bytes:
            return  # no tier on this worker
        self.hits.add_metric(key, e.spill_hits)
        self.spilled.add_metric(key, e.spilled_bytes)
        self.restored.add_metric(key, e.restored_bytes)
        self.blocks.add_metric(key, e.spill_blocks)

    def families(self) -> tuple[Metric, ...]:
        return (self.hits, self.spilled, self.restored, self.blocks)


class StatsPoller:
    """Refreshes prefill workers' ``WorkerHandle.stats`` every ``interval_s`` (decode and
    colocated workers' stats ride on their token streams). Runs on the router's loop."""

    def __init__(self, router: Router, interval_s: float) -> None:
        self.router = router
        self.interval_s = interval_s

    async def run(self) -> None:
        while True:
            prefill = [h for h in self.router.workers() if h.role == "prefill" and h.alive]
            await asyncio.gather(*(self._poll(h) for h in prefill))
            await asyncio.sleep(self.interval_s)

    async def _poll(self, h: WorkerHandle) -> None:
        # A dead or busy worker keeps its last stats; liveness is the worker registry's
        # business (lifelines), never a slow answer here. Stats wait for a step boundary,
        # which a long prompt's prefill step can keep away for many seconds: the ping
        # (answered on the actor's own loop) is what tells a busy worker from a frozen
        # one, whose requests placement would otherwise pass over.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(h.ping(), timeout=self.interval_s)
            h.heard()
            h.stats = await asyncio.wait_for(h.fetch_stats(), timeout=self.interval_s)
