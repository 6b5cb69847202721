"""Router configuration: deployment shape, resources and limits (frozen, validated)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.config import SCHEDULER_POLICIES, ConfigError, EngineConfig
from engine.worker_config import KV_BACKENDS


@dataclass(frozen=True)
class RouterConfig:
    """One deployment.

    mode: "disaggregated" (prefill_workers + decode_workers) or "colocated" (workers
        that prefill and decode).
    gpus_per_worker: 0 on CPU; a fraction (e.g. 0.5) lets prefill and decode share a GPU.
    threads_per_worker: torch threads (and Ray CPUs) per worker on CPU.
    kv_transfer: "auto" picks cuda-ipc on one GPU node, nccl across GPUs, ray on CPU.
    max_queue: requests allowed to wait for KV room; beyond it new ones are refused.
    prefill_policy: the prefill workers' scheduler policy (engine.scheduler.policy is
        what decode and colocated workers use). "shortest_first" keeps a short prompt
        from waiting behind a long prompt's chunks.
    prefill_step_tokens: the prefill workers' token budget per step (default: the
        engine's max_num_batched_tokens). A step cannot be interrupted, so a prompt
        that arrives mid-step waits for it: smaller steps start short prompts sooner,
        at some prefill throughput.
    """

    mode: str = "disaggregated"
    prefill_workers: int = 1
    decode_workers: int = 1
    workers: int = 2  # colocated
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    kv_transfer: str = "auto"
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_queue: int = 256
    transfer_timeout_s: float = 30.0
    health_interval_s: float = 2.0
    health_timeout_s: float = 10.0
    decode_watermark: float = 0.01
    ray_address: str | None = None
    prefill_policy: str = "shortest_first"
    prefill_step_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("disaggregated", "colocated"):
            raise ConfigError(f"RouterConfig.mode {self.mode!r} is not disaggregated/colocated")
        for name in ("prefill_workers", "decode_workers", "workers", "threads_per_worker",
                     "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RouterConfig.{name} must be >= 1")
        if self.prefill_policy not in SCHEDULER_POLICIES:
            raise ConfigError(f"RouterConfig.prefill_policy {self.prefill_policy!r} is not "
                              f"one of {', '.join(SCHEDULER_POLICIES)}")
        if self.prefill_step_tokens is not None and self.prefill_step_tokens < 1:
            raise ConfigError("RouterConfig.prefill_step_tokens must be >= 1")
        if self.gpus_per_worker < 0:
            raise ConfigError("RouterConfig.gpus_per_worker must be >= 0")
        if self.kv_transfer not in ("auto", *KV_BACKENDS):
            raise ConfigError(f"RouterConfig.kv_transfer {self.kv_transfer!r} is not auto or "
                              f"one of {', '.join(KV_BACKENDS)}")
        if self.kv_transfer in ("cuda-ipc", "nccl") and self.gpus_per_worker == 0:
            raise ConfigError(f"kv_transfer {self.kv_transfer} needs GPUs (gpus_per_worker > 0)")

    def resolved_kv_transfer(self) -> str:
        if self.kv_transfer != "auto":
            return self.kv_transfer
        if self.gpus_per_worker == 0:
            return "ray"
        # Workers that share a GPU cannot use NCCL (one rank per GPU); cuda-ipc works on
        # one node whatever the sharing.
        return "cuda-ipc" if self.gpus_per_worker < 1 else "nccl"

    def worker_engine(self, role: str) -> EngineConfig:
        """The engine config a worker of this role runs."""
        engine = dataclasses.replace(self.engine, num_threads=self.threads_per_worker)
        if role != "prefill":
            return engine
        sched = dataclasses.replace(
            engine.scheduler, policy=self.prefill_policy,
            max_num_batched_tokens=(self.prefill_step_tokens
                                    or engine.scheduler.max_num_batched_tokens))
        return dataclasses.replace(engine, scheduler=sched)
