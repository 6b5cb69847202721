"""The ``collective`` backend's process groups: one 2-rank group per (prefill, decode) pair.

torch.distributed's default group (``init_process_group``) is one per process and
spans every rank: one dead worker would end it for all. Here each pair gets a group
of its own, built directly from a ProcessGroup class -- ProcessGroupGloo for CPU
tensors, ProcessGroupNCCL for CUDA tensors: the same send/recv calls, another backend
name (``backend_for``).

Rendezvous: the decode worker (the listening side) runs one TCPStore server for its
lifetime, on the node address Ray reports for it (127.0.0.1 without Ray); its address
travels in its Endpoint. A pair's group meets under a key prefix of its own
(``<prefill id>/<generation>``), so a rebuilt group never reads an older one's keys;
the decode worker deletes them once its join is over (``forget_keys``), so a long-lived
store does not keep one set per group it ever hosted.

Every wait here has a bound: the store's and the group's timeouts are the transfer
timeout, and ``wait_work`` waits with it. A gloo operation towards a peer whose process
died fails at once ("Connection closed by peer"); it never completes on its own, so a
pending one is always waited on (``work.is_completed`` stays False for gloo until then).
"""

from __future__ import annotations

import contextlib
import datetime
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, Store, TCPStore

from messages.transfer import KVTransferError, KVTransferTimeout

LOCALHOST = "127.0.0.1"


def backend_for(device: torch.device) -> str:
    """gloo for CPU tensors, nccl for CUDA tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


def node_host() -> str:
    """The address this worker's groups bind to and its store is reached at: the node IP
    Ray reports for this process, or 127.0.0.1 outside Ray (unit tests, one host)."""
    import ray

    if not ray.is_initialized():
        return LOCALHOST
    return str(ray.util.get_node_ip_address())


def _td(timeout_s: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=timeout_s)


def listen(host: str, timeout_s: float) -> TCPStore:
    """The decode worker's store server, on a free port (``.port``)."""
    return TCPStore(host, 0, None, True, _td(timeout_s), wait_for_workers=False)


def connect(host: str, port: int, timeout_s: float) -> TCPStore:
    """A client of a decode worker's store (retries the connection until the timeout)."""
    return TCPStore(host, port, None, False, _td(timeout_s))


def new_group(store: Store, prefix: str, rank: int, device: torch.device, host: str,
              timeout_s: float) -> Any:
    """Join the pair's group as ``rank`` (0: prefill, 1: decode); blocks until both
    ranks joined and exchanged one message, or raises after ``timeout_s``."""
    pstore = PrefixStore(prefix, store)
    group: Any
    if backend_for(device) == "nccl":  # pragma: no cover - GPU machines only
        from torch.distributed import ProcessGroupNCCL

        nopts = ProcessGroupNCCL.Options()
        nopts._timeout = _td(timeout_s)
        group = ProcessGroupNCCL(pstore, rank, 2, nopts)
    else:
        gopts = ProcessGroupGloo._Options()
        gopts._timeout = _td(timeout_s)
        gopts._devices = [ProcessGroupGloo.create_device(hostname=host)]
        group = ProcessGroupGloo(pstore, rank, 2, gopts)
    # NCCL creates a pair's communicator at its first send/recv, blocking until both
    # ranks are in it. Here both are joining; later the decode side posts its first
    # receive before the prefill side sends, and would wait for it in vain.
    probe = torch.zeros(1, device=device)
    work = group.send([probe], 1, 0) if rank == 0 else group.recv([probe], 0, 0)
    try:
        wait_work(work, timeout_s, f"collective group {prefix}: first exchange")
    except KVTransferError:
        close_group(group)
        raise
    return group


def forget_keys(store: Store, prefix: str) -> None:
    """Delete the rendezvous keys under ``prefix``, once rank 1's join is over: joined, it
    exchanged a message with rank 0, which therefore read them; given up, rank 0's join
    fails with it. Nothing reads them again."""
    with contextlib.suppress(Exception):  # a store without list_keys keeps them: harmless
        for key in store.list_keys():
            if key.startswith(f"{prefix}/"):
                store.delete_key(key)


def close_group(group: Any) -> None:
    """End a pair's group (NCCL: abort its communicators; gloo: a no-op, its sockets
    close when the group is dropped)."""
    with contextlib.suppress(Exception):
        group.abort()


def wait_work(work: Any, timeout_s: float, what: str) -> None:
    """Wait for a send or receive, at most ``timeout_s``: KVTransferTimeout when it did
    not finish, KVTransferError when it failed (the peer is gone). NCCL: the calling
    thread's current stream is ordered after it."""
    try:
        work.wait(_td(timeout_s))
    except Exception as e:
        if "timed out" in str(e).lower() or "timeout" in type(e).__name__.lower():
            raise KVTransferTimeout(f"{what} did not complete within {timeout_s}s") from e
        raise KVTransferError(f"{what} failed: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else repr(e)


@dataclass
class PairGroup:
    """One pair's group; ``lock`` keeps the sender's post-then-send sequences whole, so
    both ranks issue their operations in one order (NCCL matches by order)."""

    group: Any
    prefix: str
    store: Store | None = None  # a sender's client store, kept alive with the group
    lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        close_group(self.group)
