"""Creating one worker actor, and waiting until it has loaded its model.

The actor class comes from runtime.actors (it imports the worker inside the actor
process: the router never loads torch). Resources are runtime.config.ray_resources':
``num_gpus`` (whole, or a fraction so prefill and decode share one GPU) or, on CPU,
``num_cpus`` equal to the worker's torch threads; plus the role's custom resources
(``--prefill-resources`` and friends), which keep it to the nodes that declare them.

An actor no node can host stays pending in Ray (it is placed if such a node joins):
``create_worker`` then waits on its first ping; the registry watches the cluster
meanwhile and reports the role unplaceable (router/node_resources.py).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import ray

from router.config import RouterConfig
from router.routing import PrefillLoad
from router.worker_handle import WorkerHandle
from runtime.actors import actor_class
from runtime.config import WorkerConfig, ray_resources

# Calls beyond the admitted requests' own: stream, lifeline, stats, aborts.
CONTROL_CALLS = 64
_deployment = itertools.count()  # actor names stay unique across routers in one Ray


def worker_options(config: RouterConfig, role: str) -> dict[str, Any]:
    """The Ray resources of one worker of ``role`` (what it needs of its node)."""
    return ray_resources(config.gpus_per_worker, config.threads_per_worker,
                         config.worker_resources(role))


async def create_worker(config: RouterConfig, worker_id: str, role: str, kv_transfer: str,
                        placement: dict[str, Any] | None = None) -> WorkerHandle:
    """``placement``: extra actor options that schedule it (a placement-group bundle,
    router/gpu_pairs.py)."""
    wcfg = WorkerConfig(worker_id=worker_id, role=role, engine=config.worker_engine(role),
                        kv_transfer=kv_transfer, transfer_timeout_s=config.transfer_timeout_s,
                        watermark=config.decode_watermark)
    opts: dict[str, Any] = {
        "name": f"pdserve-{worker_id}-{id(config):x}-{next(_deployment)}",
        "max_restarts": 0,
        # Admission keeps the calls to one actor under this: nothing queues inside Ray.
        "max_concurrency": config.admission_limit + CONTROL_CALLS,
        **worker_options(config, role), **(placement or {})}
    actor = actor_class(role).options(**opts).remote(wcfg)
    try:
        await actor.ping.remote()
        h = WorkerHandle(worker_id, role, actor)
        h.node = await actor.node.remote()
        h.kv_spec = await actor.kv_spec.remote()
        if role == "prefill":
            h.load = PrefillLoad(worker_id)
        else:
            h.stats = await actor.stats.remote()
        if role == "decode":
            h.endpoint = await actor.endpoint.remote()
    except BaseException:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
        raise
    return h
