"""One worker actor's configuration, and the Ray resources a worker asks for.

Torch-free: the router builds these and sends them to the actors it creates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.config import ConfigError, EngineConfig

ROLES = ("prefill", "decode", "colocated")
KV_BACKENDS = ("ray", "cuda-ipc", "nccl", "collective", "ray+collective")


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """One worker actor.

    role: "prefill", "decode", or "colocated" (prefills and decodes its own requests).
    kv_transfer: one of KV_BACKENDS (the router resolves "auto" before this;
        "ray+collective" picks ray or collective per pair, kvtransfer/collective_auto.py).
    transfer_timeout_s: a receive that waits longer fails the request (no hang).
    watermark: fraction of KV blocks a decode worker keeps free when accepting new
        requests, so running ones can grow without immediate preemption.
    The last two have no defaults here: the router's config owns them.
    """

    worker_id: str
    role: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    kv_transfer: str = "ray"
    transfer_timeout_s: float
    watermark: float

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"WorkerConfig.role {self.role!r} is not one of "
                              f"{', '.join(ROLES)}")
        if self.kv_transfer not in KV_BACKENDS:
            raise ConfigError(f"WorkerConfig.kv_transfer {self.kv_transfer!r} is not one of "
                              f"{', '.join(KV_BACKENDS)}")
        if self.transfer_timeout_s <= 0:
            raise ConfigError("WorkerConfig.transfer_timeout_s must be > 0")
        if not 0.0 <= self.watermark < 1.0:
            raise ConfigError("WorkerConfig.watermark must be in [0, 1)")


def ray_resources(gpus_per_worker: float, threads_per_worker: int,
                  custom: dict[str, float] | None = None) -> dict[str, Any]:
    """Ray resources of one worker actor: its GPU share and one CPU to drive it, or on
    CPU as many Ray CPUs as it runs torch threads (so Ray does not oversubscribe cores
    with more workers than fit); plus the operator's ``custom`` resources (placement on
    labelled nodes, see router/node_resources.py)."""
    opts: dict[str, Any] = ({"num_gpus": gpus_per_worker, "num_cpus": 1} if gpus_per_worker > 0
                            else {"num_cpus": threads_per_worker})
    if custom:
        opts["resources"] = dict(custom)
    return opts


def ray_cpus(num_workers: int, gpus_per_worker: float, threads_per_worker: int) -> int:
    """Ray CPUs that ``num_workers`` workers take (a local Ray must offer at least this
    many, or an actor waits forever to be placed)."""
    per = ray_resources(gpus_per_worker, threads_per_worker)["num_cpus"]
    return int(num_workers * per)


@dataclass(frozen=True)
class GpuPairing:
    """Ray placement-group bundles that put prefill worker i and decode worker i on one
    GPU, so their KV moves through CUDA IPC in place (kvtransfer/pairing.py) instead of
    the NCCL fallback that pairs on two GPUs need.

    bundles: one resource dict per bundle, for ``ray.util.placement_group``.
    bundle_of: (role, index within the role) -> the bundle that worker is scheduled in
        (``PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=...)``).
    """

    bundles: tuple[dict[str, float], ...]
    bundle_of: dict[tuple[str, int], int]


def pair_on_gpus(num_prefill: int, num_decode: int, gpus_per_worker: float,
                 cpus_per_worker: int = 1) -> GpuPairing:
    """Bundles for P prefill and D decode workers of ``gpus_per_worker`` each: the first
    min(P, D) prefill/decode pairs share a bundle of 2 x gpus_per_worker (Ray takes a
    bundle's fractional GPU from a single GPU), every other worker has its own. Pairing
    needs 2 x gpus_per_worker <= 1; otherwise each worker gets its own bundle."""
    if num_prefill < 0 or num_decode < 0:
        raise ConfigError("pair_on_gpus: worker counts must be >= 0")
    if gpus_per_worker <= 0:
        raise ConfigError("pair_on_gpus: placement on GPUs needs gpus_per_worker > 0")
    one = {"GPU": gpus_per_worker, "CPU": float(cpus_per_worker)}
    pairs = min(num_prefill, num_decode) if 2 * gpus_per_worker <= 1 else 0
    bundles: list[dict[str, float]] = []
    bundle_of: dict[tuple[str, int], int] = {}
    for i in range(pairs):
        bundle_of[("prefill", i)] = bundle_of[("decode", i)] = len(bundles)
        bundles.append({k: 2 * v for k, v in one.items()})
    for role, n in (("prefill", num_prefill), ("decode", num_decode)):
        for i in range(pairs, n):
            bundle_of[(role, i)] = len(bundles)
            bundles.append(dict(one))
    return GpuPairing(tuple(bundles), bundle_of)
