"""Router configuration: deployment shape, resources and limits (frozen, validated)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.config import SCHEDULER_POLICIES, CacheConfig, ConfigError, EngineConfig
from router.node_resources import check_resources
from runtime.config import KV_BACKENDS


@dataclass(frozen=True)
class RouterConfig:
    """One deployment.

    mode: "disaggregated" (prefill_workers + decode_workers) or "colocated" (workers
        that prefill and decode).
    gpus_per_worker: 0 on CPU; a fraction (e.g. 0.5) lets prefill and decode share a GPU.
    threads_per_worker: torch threads (and Ray CPUs) per worker on CPU.
    kv_transfer: "auto" picks per pair: with a fraction of a GPU per worker cuda-ipc
        (in place on a shared GPU, NCCL across two), with whole GPUs collective (NCCL),
        on CPU ray+collective (the object store within a Ray node, gloo across nodes).
    max_queue: requests allowed to wait for KV room; beyond it new ones are refused.
    max_inflight: requests admitted at once (streaming, prefilling or waiting), for the
        whole deployment; beyond it a new call is refused at once with
        RESOURCE_EXHAUSTED and a retry hint, so load never reads as a dead worker.
    max_inflight_per_worker: the same bound per serving (decode or colocated) worker;
        the deployment admits min(max_inflight, this x serving workers). It also keeps
        the calls queued on one actor far below Ray's per-actor concurrency.
    max_prompt_bytes: the largest prompt (text bytes) accepted; checked before it is
        tokenized, so a huge prompt costs nothing.
    request_timeout_s: how long a request may take when its client sets no deadline.
    worker_wait_s: how long a request waits for a worker of a role when none is alive
        (one is being replaced), within its deadline, before UNAVAILABLE.
    prefill_policy: the prefill workers' scheduler policy (engine.scheduler.policy is
        what decode and colocated workers use). "shortest_first" keeps a short prompt
        from waiting behind a long prompt's chunks.
    prefill_step_tokens: the prefill workers' token budget per step (default: the
        engine's max_num_batched_tokens). A step cannot be interrupted, so a prompt
        that arrives mid-step waits for it: smaller steps start short prompts sooner,
        at some prefill throughput.
    stream_interval: tokens per streamed message after the first (which goes out at
        once): 1 sends every step's token as it comes; N sends one message per N tokens,
        dividing the router's per-message cost (the gRPC or SSE write, a task wake-up)
        by about N, at the price of N steps between messages.
    prefill_resources / decode_resources / colocated_resources: custom Ray resources
        each worker of the role asks for (name -> quantity, as the nodes declare them
        with `ray start --resources`), so Ray places that role only on such nodes
        (router/node_resources.py).
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
    max_inflight: int = 1024
    max_inflight_per_worker: int = 256
    max_prompt_bytes: int = 1 << 20
    request_timeout_s: float = 600.0
    worker_wait_s: float = 120.0
    transfer_timeout_s: float = 30.0
    decode_watermark: float = 0.01
    ray_address: str | None = None
    prefill_policy: str = "shortest_first"
    prefill_step_tokens: int | None = None
    stream_interval: int = 1
    prefill_resources: dict[str, float] = field(default_factory=dict)
    decode_resources: dict[str, float] = field(default_factory=dict)
    colocated_resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for role in ("prefill", "decode", "colocated"):
            name = f"{role}_resources"
            object.__setattr__(self, name,
                               check_resources(f"RouterConfig.{name}", getattr(self, name)))
        if self.mode not in ("disaggregated", "colocated"):
            raise ConfigError(f"RouterConfig.mode {self.mode!r} is not disaggregated/colocated")
        for name in ("prefill_workers", "decode_workers", "workers", "threads_per_worker",
                     "max_queue", "max_inflight", "max_inflight_per_worker", "max_prompt_bytes",
                     "stream_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RouterConfig.{name} must be >= 1")
        if self.prefill_policy not in SCHEDULER_POLICIES:
            raise ConfigError(f"RouterConfig.prefill_policy {self.prefill_policy!r} is not "
                              f"one of {', '.join(SCHEDULER_POLICIES)}")
        if self.prefill_step_tokens is not None and self.prefill_step_tokens < 1:
            raise ConfigError("RouterConfig.prefill_step_tokens must be >= 1")
        for name in ("request_timeout_s", "worker_wait_s", "transfer_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"RouterConfig.{name} must be > 0")
        if self.gpus_per_worker < 0:
            raise ConfigError("RouterConfig.gpus_per_worker must be >= 0")
        if self.kv_transfer not in ("auto", *KV_BACKENDS):
            raise ConfigError(f"RouterConfig.kv_transfer {self.kv_transfer!r} is not auto or "
                              f"one of {', '.join(KV_BACKENDS)}")
        if self.kv_transfer in ("cuda-ipc", "nccl") and self.gpus_per_worker == 0:
            raise ConfigError(f"kv_transfer {self.kv_transfer} needs GPUs (gpus_per_worker > 0)")
        if self.kv_transfer in ("nccl", "collective") and 0 < self.gpus_per_worker < 1:
            # NCCL puts one rank on each GPU; workers of a fraction of a GPU may share one,
            # and the pair's communicator would then fail at its first transfer.
            raise ConfigError(
                f"kv_transfer {self.kv_transfer} needs a whole GPU per worker, not "
                f"gpus_per_worker "
                f"{self.gpus_per_worker:g} (fractional workers can share a GPU, which NCCL "
                "cannot span); use cuda-ipc or auto")

    def resolved_kv_transfer(self) -> str:
        if self.kv_transfer != "auto":
            return self.kv_transfer
        if self.gpus_per_worker == 0:
            # Per pair: the object store within a node, gloo across nodes -- the faster
            # of the two in each case (kvtransfer/collective_auto.py, docs/benchmarks.md).
            return "ray+collective"
        if self.gpus_per_worker >= 1:
            # Every worker has GPUs of its own, never one to share: NCCL through the
            # collective backend (its protocol is the one CI runs with gloo).
            return "collective"
        # A fraction: a prefill and a decode worker may share a GPU (CUDA IPC, in place),
        # or Ray may place them on two; each actor sees only its own GPU, so such a pair
        # cannot use IPC and cuda-ipc sends it through NCCL (kvtransfer/pairing.py).
        return "cuda-ipc"

    @property
    def serving_role(self) -> str:
        """The role that streams tokens: decode, or colocated in colocated mode."""
        return "colocated" if self.mode == "colocated" else "decode"

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles this mode needs, each with at least one live worker to serve."""
        return ("colocated",) if self.mode == "colocated" else ("prefill", "decode")

    def num_workers(self, role: str) -> int:
        return {"prefill": self.prefill_workers, "decode": self.decode_workers,
                "colocated": self.workers}[role]

    def worker_resources(self, role: str) -> dict[str, float]:
        """The custom Ray resources each worker of ``role`` asks for."""
        return {"prefill": self.prefill_resources, "decode": self.decode_resources,
                "colocated": self.colocated_resources}[role]

    @property
    def admission_limit(self) -> int:
        return min(self.max_inflight,
                   self.max_inflight_per_worker * self.num_workers(self.serving_role))

    def worker_engine(self, role: str) -> EngineConfig:
        """The engine config a worker of this role runs."""
        engine = dataclasses.replace(self.engine, num_threads=self.threads_per_worker,
                                     cache=self._worker_cache(role))
        if role != "prefill":
            return engine
        sched = dataclasses.replace(
            engine.scheduler, policy=self.prefill_policy,
            max_num_batched_tokens=(self.prefill_step_tokens
                                    or engine.scheduler.max_num_batched_tokens))
        # A prefill worker never runs a decode step: no CUDA graphs to capture.
        return dataclasses.replace(engine, scheduler=sched, cuda_graphs=False)

    def _worker_cache(self, role: str) -> CacheConfig:
        """On CPU, each worker plans its default pool on 1/N of the host's available
        memory, N the deployment's workers (all on this node in a local Ray; on a
        cluster, fewer share a node and the pools come out smaller than they could be:
        set --kv-cache-memory there). Decode workers get no spill tier: their prompts'
        KV arrives from prefill workers, they never look a prefix up."""
        cache = self.engine.cache
        if self.gpus_per_worker == 0 and cache.host_share is None:
            n = sum(self.num_workers(r) for r in self.roles)
            cache = dataclasses.replace(cache, host_share=1.0 / n)
        if role == "decode" and cache.spill_memory_bytes:
            cache = dataclasses.replace(cache, spill_memory_bytes=0)
        return cache
