"""``ray``: blocks travel through the Ray object store (CPU; any node).

The sender gathers the request's blocks into one contiguous buffer and puts it in the
object store; from then on its own blocks may be freed (the object store holds the
copy). Within a node the receiver maps the object zero-copy from shared memory; across
nodes Ray moves it. The object is released when the receiver drops the handle.
"""

from __future__ import annotations

import asyncio
import time
import warnings

import numpy as np
import ray
import torch

from kernels import gather_blocks
from kvtransfer.base import (
    Endpoint,
    KVReceiver,
    KVSender,
    KVSpec,
    KVTransferError,
    KVTransferTimeout,
    TransferHandle,
    check_spec,
    sent_handle,
    torch_dtype,
)


class RaySender(KVSender):
    backend = "ray"
    # A gather (torch reads of held blocks) and a ray.put: both fine on any thread, so a
    # send does not hold up the prefill worker's next step.
    send_off_engine_thread = True

    def send(
        self, cache: torch.Tensor, src_block_ids: list[int], dest: Endpoint,
        dest_block_ids: list[int], request_id: str,
    ) -> TransferHandle:
        check_spec(request_id, cache, dest)
        t0 = time.perf_counter()
        ids = torch.tensor(src_block_ids, dtype=torch.long, device=cache.device)
        # (n, L, 2, bs, Hkv, row) contiguous: an int8 cache's scales are bytes of its rows
        staging = gather_blocks(cache, ids).cpu()
        # Raw bytes: numpy has no bfloat16, and bytes are all the receiver needs.
        ref = ray.put(staging.view(torch.uint8).numpy())
        return sent_handle(request_id, self.backend, dest, staging, t0, payload=[ref])


class RayReceiver(KVReceiver):
    backend = "ray"

    def endpoint(self, cache: torch.Tensor, worker_id: str, spec: KVSpec) -> Endpoint:
        return Endpoint(self.backend, worker_id, spec)

    async def fetch(self, handle: TransferHandle, timeout_s: float) -> torch.Tensor:
        (ref,) = handle.payload
        try:
            arr = await asyncio.wait_for(ref, timeout=timeout_s)
        except TimeoutError as e:
            raise KVTransferTimeout(
                f"request {handle.request_id}: KV blocks did not arrive within {timeout_s}s"
            ) from e
        except ray.exceptions.RayError as e:
            raise KVTransferError(f"request {handle.request_id}: KV blocks lost: {e}") from e
        want = handle.num_blocks * handle.spec.block_nbytes()
        if not isinstance(arr, np.ndarray) or arr.nbytes != want:
            raise KVTransferError(f"request {handle.request_id}: got {getattr(arr, 'nbytes', 0)} "
                                  f"bytes of KV, expected {want}")
        with warnings.catch_warnings():  # object-store arrays are read-only; we only read
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(arr)
        return raw.view(torch_dtype(handle.spec)).view(handle.num_blocks, *handle.spec.block_shape)
