"""One worker actor's configuration, and the Ray resources a worker asks for.

Torch-free: the router builds these and sends them to the actors it creates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import ConfigError, EngineConfig

ROLES = ("prefill", "decode", "colocated")
KV_BACKENDS = ("ray", "cuda-ipc", "nccl")


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """One worker actor.

    role: "prefill", "decode", or "colocated" (prefills and decodes its own requests).
    kv_transfer: "ray" | "cuda-ipc" | "nccl" (the router resolves "auto" before this).
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


def ray_resources(gpus_per_worker: float, threads_per_worker: int) -> dict[str, float]:
    """Ray resources of one worker actor: its GPU share and one CPU to drive it, or on
    CPU as many Ray CPUs as it runs torch threads (so Ray does not oversubscribe cores
    with more workers than fit)."""
    if gpus_per_worker > 0:
        return {"num_gpus": gpus_per_worker, "num_cpus": 1}
    return {"num_cpus": threads_per_worker}


def ray_cpus(num_workers: int, gpus_per_worker: float, threads_per_worker: int) -> int:
    """Ray CPUs that ``num_workers`` workers take (a local Ray must offer at least this
    many, or an actor waits forever to be placed)."""
    per = ray_resources(gpus_per_worker, threads_per_worker)["num_cpus"]
    return int(num_workers * per)
