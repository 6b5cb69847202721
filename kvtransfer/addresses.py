"""Backend-specific Endpoint addresses, torch-free: the router carries (and unpickles)
endpoints without importing a backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class IpcAddress:
    """cuda-ipc: the decode worker's cache allocation, exported."""

    handle: bytes  # cudaIpcMemHandle_t of the allocation holding the cache
    device: int  # CUDA device index in the decode worker's process
    device_uuid: str  # to find the same GPU under another CUDA_VISIBLE_DEVICES mapping
    num_blocks: int
    offset: int = 0  # the cache's first byte, from the allocation's start
    # The decode worker's actor (a kvtransfer.peer.KVPeer): a prefill worker that cannot
    # see this GPU sends through NCCL instead (kvtransfer/pairing.py). None: no fallback.
    peer: Any = None


@dataclass(frozen=True)
class NcclAddress:
    """nccl: the decode worker's actor, a kvtransfer.peer.KVPeer."""

    peer: Any


@dataclass(frozen=True)
class CollectiveAddress:
    """collective: the decode worker's actor (a kvtransfer.peer.KVPeer) and the TCP store
    its pair groups meet at (on the node address Ray reports for it)."""

    peer: Any
    host: str
    port: int


@dataclass(frozen=True)
class PerPairAddress:
    """ray+collective: the decode worker's Ray node (a sender on the same node uses the
    object store) and its collective address (a sender on another node uses gloo)."""

    node_id: str
    collective: CollectiveAddress
