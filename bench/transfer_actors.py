"""The two ends of a measured KV transfer: one Ray actor class, the real backends inside.

A ``TransferEnd`` holds a KV cache in engine.kv_layout's layout and, for each backend
measured, sends blocks (its KVSender, as a prefill worker does) or receives them (its
KVReceiver, then the scatter into the reserved blocks, as a decode worker's import
does). It is also its receivers' KVPeer, so the collective handshake reaches it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import ray


@ray.remote(num_cpus=0)
class TransferEnd:
    def __init__(self, backends: tuple[str, ...], block_shape: tuple[int, ...],
                 num_blocks: int, timeout_s: float = 60.0) -> None:
        import torch

        from kvtransfer import make_receiver, make_sender
        from kvtransfer.base import KVSpec

        torch.set_num_threads(1)
        self.cache = torch.randn(num_blocks, *block_shape)
        self.spec = KVSpec(tuple(block_shape), "float32", 4)
        me = ray.get_runtime_context().get_actor_id()
        self.senders = {b: make_sender(b, f"bench-{me}") for b in backends}
        self.receivers = {b: make_receiver(b) for b in backends}
        self.timeout_s = timeout_s
        self._endpoints: dict[str, Any] = {}

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def endpoint(self, backend: str) -> Any:
        if backend not in self._endpoints:
            me = ray.get_runtime_context().get_actor_id()
            self._endpoints[backend] = self.receivers[backend].endpoint(
                self.cache, f"bench-{me}", self.spec)
        return self._endpoints[backend]

    async def kv_peer(self, message: Any) -> None:
        await self.receivers["collective"].on_peer_message(message)

    async def send(self, dest: Any, block_ids: list[int], request_id: str) -> Any:
        """Send blocks with ``dest``'s backend; (handle, seconds the send took)."""
        import torch

        sender = self.senders[dest.backend]
        await sender.prepare(dest, torch.device("cpu"), self.timeout_s)
        t0 = time.perf_counter()
        handle = await asyncio.to_thread(sender.send, self.cache, block_ids, dest,
                                         block_ids, request_id)
        return handle, time.perf_counter() - t0

    async def receive(self, handle: Any, block_ids: list[int]) -> tuple[float, float]:
        """Fetch and scatter into ``block_ids``; (seconds, checksum of what landed)."""
        import torch

        from kernels import scatter_blocks

        t0 = time.perf_counter()
        staging = await self.receivers[handle.backend].fetch(handle, self.timeout_s)
        ids = torch.tensor(block_ids, dtype=torch.long)
        scatter_blocks(self.cache, ids, staging)
        return time.perf_counter() - t0, float(self.cache[ids].sum())

    def checksum(self, block_ids: list[int]) -> float:
        return float(self.cache[block_ids].sum())
