"""The Ray side of the router: creating, watching and replacing worker actors.

Actors are created with the resources the config asks for: ``num_gpus`` (whole, or a
fraction so prefill and decode share one GPU) or, on CPU, ``num_cpus`` equal to the
torch threads of the worker. A worker that stops answering pings within the health
timeout is killed and replaced; the router migrates whatever it held.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import ray

from decode_worker.messages import WorkerStats
from decode_worker.worker import DecodeWorker
from engine.worker_config import WorkerConfig
from kvtransfer import Endpoint
from prefill_worker.worker import PrefillWorker
from router.config import RouterConfig
from router.routing import PrefillLoad

log = logging.getLogger(__name__)


@dataclass
class WorkerHandle:
    worker_id: str
    role: str  # prefill | decode | colocated
    actor: Any  # ray ActorHandle
    endpoint: Endpoint | None = None
    stats: WorkerStats | None = None
    alive: bool = True
    load: PrefillLoad | None = None  # prefill workers
    stream_task: asyncio.Task[None] | None = None
    requests: set[str] = field(default_factory=set)  # decode/colocated: ids it holds
    # Blocks reserved since the last stats report: a burst of requests must not all pick
    # the worker whose (stale) stats looked emptiest.
    fresh_blocks: int = 0

    def est_usage(self) -> float:
        """Estimated KV usage including reservations the stats do not show yet."""
        if self.stats is None:
            return 0.0
        return self.stats.kv_usage + self.fresh_blocks / max(self.stats.num_usable_blocks, 1)


class Cluster:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.kv_transfer = config.resolved_kv_transfer()
        self.workers: dict[str, WorkerHandle] = {}
        self._ids = itertools.count()
        self._owns_ray = False

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        if not ray.is_initialized():
            ray.init(address=self.config.ray_address, include_dashboard=False,
                     log_to_driver=True, ignore_reinit_error=True)
            self._owns_ray = True
        roles = (["colocated"] * self.config.workers if self.config.mode == "colocated"
                 else ["prefill"] * self.config.prefill_workers
                 + ["decode"] * self.config.decode_workers)
        await asyncio.gather(*(self.spawn(r) for r in roles))

    async def spawn(self, role: str) -> WorkerHandle:
        """Create one worker actor and wait until it has loaded its model."""
        wid = f"{role}-{next(self._ids)}"
        cfg = self.config
        wcfg = WorkerConfig(worker_id=wid, role=role, engine=cfg.worker_engine(role),
                            kv_transfer=self.kv_transfer,
                            transfer_timeout_s=cfg.transfer_timeout_s,
                            watermark=cfg.decode_watermark)
        cls = PrefillWorker if role == "prefill" else DecodeWorker
        opts: dict[str, Any] = {"name": f"pdserve-{wid}-{id(self):x}", "max_restarts": 0}
        if cfg.gpus_per_worker > 0:
            opts |= {"num_gpus": cfg.gpus_per_worker, "num_cpus": 1}
        else:
            opts["num_cpus"] = cfg.threads_per_worker
        actor = ray.remote(cls).options(**opts).remote(wcfg)
        await actor.ping.remote()
        h = WorkerHandle(wid, role, actor)
        if role == "prefill":
            h.load = PrefillLoad(wid)
        else:
            h.endpoint = await actor.endpoint.remote()
            h.stats = await actor.stats.remote()
        self.workers[wid] = h
        return h

    async def shutdown(self) -> None:
        for h in list(self.workers.values()):
            if h.stream_task is not None:
                h.stream_task.cancel()
            self.kill(h)
        self.workers.clear()
        if self._owns_ray:
            ray.shutdown()

    def kill(self, h: WorkerHandle) -> None:
        h.alive = False
        try:
            ray.kill(h.actor, no_restart=True)
        except Exception:  # already gone
            log.debug("kill %s: already gone", h.worker_id)

    # -- views ---------------------------------------------------------------------------
    def live(self, role: str) -> list[WorkerHandle]:
        return [h for h in self.workers.values() if h.alive and h.role == role]

    async def ping(self, h: WorkerHandle) -> bool:
        try:
            await asyncio.wait_for(h.actor.ping.remote(), timeout=self.config.health_timeout_s)
            return True
        except Exception:
            return False
