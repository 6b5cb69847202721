"""The KV transfer interface: a prefill worker sends blocks, a decode worker receives them.

Both ends hold a KV cache in engine.kv_layout's layout. A transfer moves whole blocks
(all layers, K and V): ``src`` block ids on the sender to ``dest`` block ids the
receiver reserved. Every transfer is checked: block shape, dtype and count must agree
on both ends, and receiving gives up after a timeout with KVTransferTimeout instead of
hanging.

Who frees what:
- The sender's blocks may be freed once ``send`` has returned *and* ``sender_done``
  (see each backend) is true; the prefill worker keeps them until then.
- The receiver's reserved blocks belong to the decode engine; if ``receive`` raises,
  the decode worker frees them.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.kv_layout import KVLayout


class KVTransferError(RuntimeError):
    """A transfer could not be completed (mismatched ends, lost data, backend failure)."""


class KVTransferTimeout(KVTransferError):
    """The data did not arrive within the transfer timeout."""


@dataclass(frozen=True)
class KVSpec:
    """What both ends of a transfer must agree on."""

    block_shape: tuple[int, ...]  # (num_layers, 2, block_size, kv_heads, head_dim)
    dtype: str  # e.g. "float32"

    @classmethod
    def of(cls, layout: KVLayout) -> KVSpec:
        return cls(tuple(layout.block_shape), str(layout.dtype).removeprefix("torch."))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def block_nbytes(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * torch.empty((), dtype=self.torch_dtype).element_size()


@dataclass(frozen=True)
class Endpoint:
    """How a sender reaches one decode worker's cache (backend-specific ``address``)."""

    backend: str
    worker_id: str
    spec: KVSpec
    address: Any = None  # cuda-ipc: IPC memory handle info; nccl: peer info; ray: None


@dataclass
class TransferHandle:
    """What the sender returns and the router passes to the receiver."""

    request_id: str
    backend: str
    spec: KVSpec
    num_blocks: int
    nbytes: int
    payload: Any = None  # ray: [ObjectRef] (wrapped so Ray does not resolve it in transit)
    sent_at: float = field(default_factory=time.time)
    send_seconds: float = 0.0


def check_handle(handle: TransferHandle, spec: KVSpec, dest_block_ids: list[int]) -> None:
    """Raise KVTransferError unless the handle fits this receiver and its reservation."""
    if handle.spec != spec:
        raise KVTransferError(
            f"request {handle.request_id}: KV layout mismatch: sender {handle.spec} vs "
            f"receiver {spec}")
    if handle.num_blocks != len(dest_block_ids):
        raise KVTransferError(
            f"request {handle.request_id}: {handle.num_blocks} blocks sent, "
            f"{len(dest_block_ids)} reserved")


def check_counts(request_id: str, src_block_ids: list[int], dest_block_ids: list[int]) -> None:
    if len(src_block_ids) != len(dest_block_ids):
        raise KVTransferError(f"request {request_id}: {len(src_block_ids)} blocks to send, "
                              f"{len(dest_block_ids)} reserved")


class KVSender(abc.ABC):
    """Prefill side. ``send`` runs on the prefill worker's engine thread between steps,
    or, when ``send_off_engine_thread`` is set, on a thread of its own while the engine
    keeps stepping (it then only reads blocks the worker holds for the request)."""

    backend: str
    # Only backends verified to be safe beside a running engine step say True.
    send_off_engine_thread: bool = False

    @abc.abstractmethod
    def send(
        self, cache: torch.Tensor, src_block_ids: list[int], dest: Endpoint,
        dest_block_ids: list[int], request_id: str,
    ) -> TransferHandle:
        """Start moving src blocks towards dest; returns once src blocks may be freed."""


class KVReceiver(abc.ABC):
    """Decode side."""

    backend: str

    @abc.abstractmethod
    def endpoint(self, cache: torch.Tensor, worker_id: str, spec: KVSpec) -> Endpoint:
        """Describe this worker's cache to senders (called once at start-up)."""

    @abc.abstractmethod
    async def fetch(self, handle: TransferHandle, timeout_s: float) -> torch.Tensor | None:
        """Wait for the data. Returns a (n, *block_shape) staging tensor to scatter into
        the reserved blocks, or None when the sender already wrote them in place."""
