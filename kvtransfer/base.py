"""The KV transfer interface: a prefill worker sends blocks, a decode worker receives them.

Both ends hold a KV cache in engine.kv_layout's layout. A transfer moves whole blocks
(all layers, K and V): ``src`` block ids on the sender to ``dest`` block ids the
receiver reserved. Every transfer is checked: block shape, dtype and count must agree
on both ends, and receiving gives up after a timeout with KVTransferTimeout instead of
hanging. The values that travel (KVSpec, Endpoint, TransferHandle, the errors) live in
messages.transfer; this module is importable without torch.

Who frees what:
- The sender's blocks may be freed once ``KVSender.send`` has returned: every backend
  returns only when it no longer reads them (a copy is in the object store, or the
  data is in the receiver's cache or NCCL has sent it).
- The receiver's reserved blocks belong to the decode engine; if ``KVReceiver.fetch``
  raises (or ``check_handle`` refuses the handle), the decode worker frees them.
"""

from __future__ import annotations

import abc
import time
from typing import TYPE_CHECKING, Any

from messages.transfer import (
    Endpoint,
    KVSpec,
    KVTransferError,
    KVTransferTimeout,
    TransferHandle,
)

if TYPE_CHECKING:
    import torch

    from engine.kv_layout import KVLayout
    from kvtransfer.peer import PeerMessage

__all__ = [
    "Endpoint",
    "KVReceiver",
    "KVSender",
    "KVSpec",
    "KVTransferError",
    "KVTransferTimeout",
    "TransferHandle",
    "check_counts",
    "check_handle",
    "check_spec",
    "sent_handle",
    "spec_of",
    "spec_of_blocks",
    "torch_dtype",
]


def spec_of(layout: KVLayout) -> KVSpec:
    """The spec of an engine's cache layout (its storage dtype: int8 for an int8 cache)."""
    dtype = layout.storage_dtype
    return KVSpec(tuple(layout.block_shape), str(dtype).removeprefix("torch."),
                  dtype.itemsize, layout.scale_layout)


def spec_of_blocks(blocks: torch.Tensor) -> KVSpec:
    """The spec of a cache or staging tensor (n, *block_shape): what a sender holds.
    Equal to spec_of(layout) for the engine the tensor belongs to."""
    from kernels.kv_quant import SCALE_LAYOUT, is_quantized

    return KVSpec(tuple(blocks.shape[1:]), str(blocks.dtype).removeprefix("torch."),
                  blocks.element_size(), SCALE_LAYOUT if is_quantized(blocks.dtype) else "")


def check_spec(request_id: str, cache: torch.Tensor, dest: Endpoint) -> None:
    """Senders call this before moving anything: refuses a destination whose cache does
    not hold blocks like ours (an int8 prefill worker and an fp32 decode worker)."""
    ours = spec_of_blocks(cache)
    if ours != dest.spec:
        raise KVTransferError(
            f"request {request_id}: KV layout mismatch: this sender has {ours.describe()}, "
            f"decode worker {dest.worker_id} has {dest.spec.describe()}; start both with the "
            "same --kv-cache-dtype")


def torch_dtype(spec: KVSpec) -> torch.dtype:
    import torch

    return getattr(torch, spec.dtype)


def check_handle(handle: TransferHandle, spec: KVSpec, dest_block_ids: list[int]) -> None:
    """Raise KVTransferError unless the handle fits this receiver and its reservation."""
    if handle.spec != spec:
        raise KVTransferError(
            f"request {handle.request_id}: KV layout mismatch: sender {handle.spec.describe()}"
            f" vs receiver {spec.describe()}")
    if handle.num_blocks != len(dest_block_ids):
        raise KVTransferError(
            f"request {handle.request_id}: {handle.num_blocks} blocks sent, "
            f"{len(dest_block_ids)} reserved")


def check_counts(request_id: str, src_block_ids: list[int], dest_block_ids: list[int]) -> None:
    if len(src_block_ids) != len(dest_block_ids):
        raise KVTransferError(f"request {request_id}: {len(src_block_ids)} blocks to send, "
                              f"{len(dest_block_ids)} reserved")


def sent_handle(request_id: str, backend: str, dest: Endpoint, staging: torch.Tensor,
                started: float, payload: Any = None) -> TransferHandle:
    """The handle of a finished send of ``staging`` (n, *block_shape), begun at
    ``started`` (time.perf_counter). Its spec is the sender's blocks' own (so the
    receiver's check_handle compares the two ends, not the endpoint with itself)."""
    return TransferHandle(
        request_id=request_id, backend=backend, spec=spec_of_blocks(staging),
        num_blocks=staging.shape[0],
        nbytes=staging.numel() * staging.element_size(), payload=payload,
        send_seconds=time.perf_counter() - started,
    )


class KVSender(abc.ABC):
    """Prefill side. ``send`` runs on the prefill worker's engine thread between steps,
    or, when ``send_off_engine_thread`` is set, on a thread of its own while the engine
    keeps stepping (it then only reads blocks the worker holds for the request)."""

    backend: str
    # Only backends verified to be safe beside a running engine step say True.
    send_off_engine_thread: bool = False

    async def prepare(self, dest: Endpoint, device: torch.device, timeout_s: float) -> None:
        """Set up what sending to ``dest`` needs (nccl: the pair's communicator), on the
        actor's event loop before the send, so the engine thread never waits for it.
        Raises KVTransferError (KVTransferTimeout after ``timeout_s``)."""
        return None

    @abc.abstractmethod
    def send(
        self, cache: torch.Tensor, src_block_ids: list[int], dest: Endpoint,
        dest_block_ids: list[int], request_id: str,
    ) -> TransferHandle:
        """Move src blocks towards dest; returns once src blocks may be freed."""


class KVReceiver(abc.ABC):
    """Decode side."""

    backend: str

    def allocate(self, layout: KVLayout, device: torch.device) -> torch.Tensor | None:
        """A cache this backend needs the engine to use instead of its own, or None:
        the engine's cache will do (every backend here; cuda-ipc exports it as is)."""
        return None

    @abc.abstractmethod
    def endpoint(self, cache: torch.Tensor, worker_id: str, spec: KVSpec) -> Endpoint:
        """Describe this worker's cache to senders (called once at start-up)."""

    @abc.abstractmethod
    async def fetch(self, handle: TransferHandle, timeout_s: float) -> torch.Tensor | None:
        """Wait for the data. Returns a (n, *block_shape) staging tensor to scatter into
        the reserved blocks, or None when the sender already wrote them in place."""

    def cancel(self, request_id: str) -> None:
        """The request was aborted: drop whatever this receiver holds for it (nccl: a
        posted receive and its buffer, once NCCL no longer writes it)."""
        return None

    async def on_peer_message(self, message: PeerMessage) -> None:
        """A sender's handshake step (see kvtransfer.peer); only nccl has any."""
        raise KVTransferError(f"the {self.backend} backend takes no peer messages "
                              f"(got {type(message).__name__})")
