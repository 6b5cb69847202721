"""The worker actors as the router sees them: one Ray actor class per role.

Every remote call the router can make to a worker is declared here, typed, in one file.
Each class only forwards to the role's real worker, which it imports inside the actor
process when the actor starts: this module (and so the router) never imports torch or
the model code.

    actor = actor_class("decode").options(**ray_resources(...)).remote(worker_config)
    blocks = await actor.reserve.remote(request_id, prompt_token_ids, params)

Calls every role answers (_Actor): ping, lifeline, node, kv_spec, stats, pool_state,
shutdown.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from engine.sampling_params import SamplingParams
from messages import (
    Endpoint,
    KVSpec,
    PrefillResult,
    PrefillTask,
    TokenLogprobs,
    TransferHandle,
    WorkerStats,
)
from runtime.config import WorkerConfig
from runtime.memory_config import configure_worker_memory  # no torch: the router imports this
from runtime.token_channel import ChannelAddress, TokenChannelServer

if TYPE_CHECKING:
    from colocated_worker.worker import ColocatedWorker
    from decode_worker.worker import DecodeWorker
    from kvtransfer.peer import PeerMessage
    from prefill_worker.worker import PrefillWorker
    from runtime.worker_base import WorkerBase


class NodeInfo(NamedTuple):
    """The Ray node a worker runs on."""

    node_id: str  # Ray's node id (hex), as `ray status` and ray.nodes() show it
    node_address: str  # the node's IP address


class _Actor:
    _worker: WorkerBase

    def node(self) -> NodeInfo:
        """Where this worker runs (GetServerInfo, and telling a node's loss apart)."""
        import ray

        return NodeInfo(ray.get_runtime_context().get_node_id(),
                        ray.util.get_node_ip_address())

    def ping(self) -> str:
        """The worker id, once the worker has loaded its model."""
        return self._worker.ping()

    async def lifeline(self) -> None:
        """Never returns; Ray fails it when the actor dies (the router's death signal)."""
        await self._worker.lifeline()

    def kv_spec(self) -> KVSpec:
        """How its KV cache stores blocks, resolved on its device (the router refuses a
        prefill or decode worker whose spec differs from the others')."""
        return self._worker.kv_spec()

    async def stats(self) -> WorkerStats:
        return await self._worker.stats()

    async def pool_state(self) -> dict[str, int]:
        """The engine's block accounting (LLMEngine.pool_state)."""
        return await self._worker.pool_state()

    def shutdown(self) -> None:
        self._worker.shutdown()


class PrefillActor(_Actor):
    _worker: PrefillWorker

    def __init__(self, config: WorkerConfig) -> None:
        configure_worker_memory()  # before the model loads: oneDNN reads its caps once
        from prefill_worker.worker import PrefillWorker

        self._worker = PrefillWorker(config)

    async def prefill(self, task: PrefillTask) -> PrefillResult:
        """Prefill, sample the first token, ship the KV to task.dest. Raises
        PrefillAborted if aborted meanwhile, KVTransferError if the send fails."""
        return await self._worker.prefill(task)

    async def abort(self, request_id: str) -> bool:
        return await self._worker.abort(request_id)


class _StreamingActor(_Actor):
    """Decode and colocated workers: their tokens stream to the router."""

    _worker: DecodeWorker | ColocatedWorker
    _channel: TokenChannelServer | None = None

    async def stream_channel(self) -> ChannelAddress:
        """Where to read this worker's token stream -- one StepBatch per engine step, or
        a heartbeat each second, never ending -- on a connection of its own
        (runtime/token_channel.py: Ray's streaming generator costs ~2 ms a step)."""
        import ray

        if self._channel is None:
            self._channel = TokenChannelServer(self._worker.stream)
        return await self._channel.open(ray.util.get_node_ip_address())


class DecodeActor(_StreamingActor):
    """Also the kvtransfer.peer.KVPeer of its KV receiver (``kv_peer``)."""

    _worker: DecodeWorker

    def __init__(self, config: WorkerConfig) -> None:
        configure_worker_memory()
        from decode_worker.worker import DecodeWorker

        self._worker = DecodeWorker(config)

    def endpoint(self) -> Endpoint:
        """Where prefill workers send this worker's KV (put it in PrefillTask.dest)."""
        return self._worker.endpoint()

    async def reserve(self, request_id: str, prompt_token_ids: list[int],
                      params: SamplingParams, age_s: float = 0.0) -> list[int] | None:
        """Block ids for the prompt's KV, or None: no room above the watermark.
        ``age_s``: seconds since the request arrived at the router."""
        return await self._worker.reserve(request_id, prompt_token_ids, params, age_s)

    async def start(self, request_id: str, first_token: int, handle: TransferHandle,
                    logprobs: TokenLogprobs | None = None, num_cached_tokens: int = 0) -> None:
        """Import the KV into the reservation and join the batch (KVTransferError: the
        reservation is freed)."""
        await self._worker.start(request_id, first_token, handle, logprobs,
                                 num_cached_tokens)

    async def abort(self, request_id: str) -> bool:
        return await self._worker.abort(request_id)

    async def kv_peer(self, message: PeerMessage) -> None:
        await self._worker.kv_peer(message)


class ColocatedActor(_StreamingActor):
    _worker: ColocatedWorker

    def __init__(self, config: WorkerConfig) -> None:
        configure_worker_memory()
        from colocated_worker.worker import ColocatedWorker

        self._worker = ColocatedWorker(config)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, age_s: float = 0.0) -> None:
        """Queue a whole request (prefill and decode here); tokens come on the stream
        (stream_channel). ``age_s``: seconds since the request arrived at the router."""
        await self._worker.generate(request_id, prompt_token_ids, params, age_s)

    async def abort(self, request_id: str) -> bool:
        return await self._worker.abort(request_id)


ACTORS: dict[str, type[_Actor]] = {  # one per runtime.config.ROLES
    "prefill": PrefillActor, "decode": DecodeActor, "colocated": ColocatedActor,
}


def actor_class(role: str) -> Any:
    """The Ray actor class of ``role`` (a ray.actor.ActorClass): call
    ``.options(...).remote(worker_config)`` on it."""
    import ray

    return ray.remote(ACTORS[role])
