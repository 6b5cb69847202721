"""Refusing a worker whose KV cache layout differs from the deployment's.

Every prefill worker ships KV blocks to every decode worker, so all of them must store
blocks alike: the same KVSpec (element type, block shape, scale layout). Each transfer
checks this too (kvtransfer.check_spec / check_handle), but only when a request
arrives, and then every request fails. The layout is resolved on the worker, from its
device: dtype "auto" is fp32 on CPU and bf16 on CUDA, and a KV dtype may depend on what
the GPU supports -- so a prefill worker on a GPU node and a decode worker on a CPU node
(or on another GPU generation) can disagree with identical flags. The registry asks
each worker for its spec when it comes up and passes it through here.

The first admitted worker sets the deployment's spec; each later one must match it.
Colocated workers never exchange KV and are not checked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from messages import KVSpec
from router.errors import KVSpecMismatch
from router.worker_handle import WorkerHandle

TRANSFER_ROLES = ("prefill", "decode")  # the roles whose workers exchange KV blocks


class _Agreed(NamedTuple):
    worker_id: str  # the worker that set it (named in refusals if no peer is alive)
    spec: KVSpec


class KVSpecGate:
    def __init__(self) -> None:
        self.agreed: _Agreed | None = None

    def admit(self, h: WorkerHandle, peers: Iterable[WorkerHandle]) -> None:
        """Let ``h`` in, or raise KVSpecMismatch naming it, a running peer (``peers``:
        the registry's workers) and both specs."""
        if h.role not in TRANSFER_ROLES or h.kv_spec is None:
            return
        agreed = self.agreed
        if agreed is None:
            self.agreed = _Agreed(h.worker_id, h.kv_spec)
        elif h.kv_spec != agreed.spec:
            raise KVSpecMismatch(_message(h, _witness(h, peers, agreed), agreed.spec))


def _witness(h: WorkerHandle, peers: Iterable[WorkerHandle], agreed: _Agreed) -> str:
    """A live worker holding the agreed spec, one of the other role if there is one
    (that is the pair whose transfers would fail); else the worker that set it."""
    live = [p for p in peers if p is not h and p.alive and p.role in TRANSFER_ROLES
            and p.kv_spec == agreed.spec]
    live.sort(key=lambda p: p.role == h.role)
    if live:
        return f"{live[0].role} worker {live[0].worker_id}"
    return f"worker {agreed.worker_id} (gone now)"


def _message(h: WorkerHandle, witness: str, agreed: KVSpec) -> str:
    assert h.kv_spec is not None
    return (f"KV layout mismatch: {h.role} worker {h.worker_id} stores "
            f"{h.kv_spec.describe()}, but {witness} stores {agreed.describe()} "
            f"({'; '.join(h.kv_spec.differences(agreed))}). No KV can move between them: "
            "give every prefill and decode worker the same kv_cache_dtype, model dtype "
            "and block_size, and note that 'auto' resolves per device (dtype auto is fp32 "
            "on CPU, bf16 on CUDA)")
