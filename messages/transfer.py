"""What the two ends of a KV transfer and the router between them pass around.

The mechanics (gather, send, fetch, scatter) are kvtransfer's; these values only
describe a cache and a transfer, so the router can carry them without torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


class KVTransferError(RuntimeError):
    """A transfer could not be completed (mismatched ends, lost data, backend failure)."""


class KVTransferTimeout(KVTransferError):
    """The data did not arrive within the transfer timeout."""


# What each entry of KVSpec.block_shape is (engine/kv_layout.py's block shape).
BLOCK_DIMS = ("layers", "K/V", "block tokens", "KV heads", "row")


@dataclass(frozen=True)
class KVSpec:
    """What both ends of a transfer must agree on: one block's shape, element type and
    scale layout (kvtransfer.spec_of builds it from an engine's KVLayout).

    A quantized cache (``--kv-cache-dtype int8``/``fp8``) has ``dtype`` "int8" or
    "float8_e4m3fn", rows of head_dim values plus a 4-byte fp32 scale (block_shape's
    last entry is head_dim + 4) and ``scales`` "fp32-per-token-head": the scales are
    bytes of the block and travel with it on every backend. Two ends that differ in any
    field -- an int8 prefill worker and an fp32 decode worker -- are refused."""

    block_shape: tuple[int, ...]  # (num_layers, 2, block_size, kv_heads, row)
    dtype: str  # torch dtype name of the stored values, e.g. "float32", "int8"
    itemsize: int  # bytes per element, so sizes are known without torch
    scales: str = ""  # "" (not quantized) or how scales are stored, e.g. "fp32-per-token-head"

    def describe(self) -> str:
        """For error messages: "int8 KV (fp32-per-token-head scales), blocks of (...)"."""
        kind = f"{self.dtype} KV" + (f" ({self.scales} scales)" if self.scales else "")
        return f"{kind}, blocks of {self.block_shape}"

    def differences(self, other: KVSpec) -> list[str]:
        """Each field that differs, named: ["dtype float32 vs int8", "row 64 vs 68"] (so a
        refusal says what to change, not only two shapes to compare)."""
        out = [f"{name} {getattr(self, name) or 'none'} vs {getattr(other, name) or 'none'}"
               for name in ("dtype", "scales") if getattr(self, name) != getattr(other, name)]
        if len(self.block_shape) != len(other.block_shape):
            return [*out, f"block shape {self.block_shape} vs {other.block_shape}"]
        return out + [f"{name} {a} vs {b}" for name, a, b
                      in zip(BLOCK_DIMS, self.block_shape, other.block_shape, strict=True)
                      if a != b]

    def block_nbytes(self) -> int:
        n = self.itemsize
        for d in self.block_shape:
            n *= d
        return n


@dataclass(frozen=True)
class Endpoint:
    """How a sender reaches one decode worker's cache (backend-specific ``address``,
    opaque to the router: kvtransfer.addresses)."""

    backend: str
    worker_id: str
    spec: KVSpec
    address: Any = None


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
