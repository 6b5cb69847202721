"""Configuration shared by prefill and decode workers (one per worker actor)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import ConfigError, EngineConfig

KV_BACKENDS = ("ray", "cuda-ipc", "nccl")


@dataclass(frozen=True)
class WorkerConfig:
    """One worker actor.

    role: "prefill", "decode", or "colocated" (a decode worker that prefills itself).
    kv_transfer: "ray" | "cuda-ipc" | "nccl" (the router resolves "auto" before this).
    transfer_timeout_s: a receive that waits longer fails the request (no hang).
    watermark: fraction of KV blocks a decode worker keeps free when accepting new
        requests, so running ones can grow without immediate preemption.
    """

    worker_id: str
    role: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    kv_transfer: str = "ray"
    transfer_timeout_s: float = 30.0
    watermark: float = 0.01

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode", "colocated"):
            raise ConfigError(f"WorkerConfig.role {self.role!r} is not prefill/decode/colocated")
        if self.kv_transfer not in KV_BACKENDS:
            raise ConfigError(f"WorkerConfig.kv_transfer {self.kv_transfer!r} is not one of "
                              f"{', '.join(KV_BACKENDS)}")
        if self.transfer_timeout_s <= 0:
            raise ConfigError("WorkerConfig.transfer_timeout_s must be > 0")
        if not 0.0 <= self.watermark < 1.0:
            raise ConfigError("WorkerConfig.watermark must be in [0, 1)")
