"""How a sender drives the receiving worker for backends that need a handshake (nccl).

The receiver's worker is a Ray actor that implements ``KVPeer``: it hands every
``PeerMessage`` to its KVReceiver's ``on_peer_message``. The sender reaches it through
the actor handle the receiver put in its Endpoint's address, and only through
``to_peer`` -- no backend calls a worker's methods by name. (Whether a peer's actor still
lives is asked with Ray's own ``__ray_ready__``, kvtransfer/peer_sweep.py.)
"""

from __future__ import annotations

from typing import Any, Protocol


class PeerMessage:
    """Base of the messages a backend's sender sends its receiver (nccl.py has them)."""


class KVPeer(Protocol):
    """What a receiving worker's actor exposes to senders (runtime.actors.DecodeActor).

    ``kv_peer`` returns once the receiver has acted on the message (a posted receive is
    posted), so a sender that waits for the call can rely on it.
    """

    async def kv_peer(self, message: PeerMessage) -> None: ...


def to_peer(peer: Any, message: PeerMessage) -> Any:
    """Send ``message`` to the KVPeer actor ``peer``; returns the call's ObjectRef."""
    return peer.kv_peer.remote(message)
