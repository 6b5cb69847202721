"""What crosses a process boundary between the router and the workers, in one place.

Typed dataclasses only (no dicts of strings), torch-free, importing nothing of the
router, the workers or kvtransfer, so either side can unpickle what the other sent:

- stats.py     WorkerStats (a worker's load, with its engine's EngineStats and PoolState)
- stream.py    TokenEvent, StepBatch (a decode or colocated worker's token stream)
- prefill.py   PrefillTask, PrefillResult, PrefillAborted (router <-> prefill worker)
- transfer.py  KVSpec, Endpoint, TransferHandle and the transfer errors (prefill ->
               router -> decode; the mechanics are kvtransfer's)
- TokenLogprobs (engine.logprobs) and EngineStats (engine.stats), re-exported: the
  engine produces them, the router reads them.
"""

from __future__ import annotations

from engine.logprobs import TokenLogprobs
from engine.stats import EngineStats
from messages.prefill import PrefillAborted, PrefillFailed, PrefillResult, PrefillTask
from messages.stats import PoolState, WorkerStats
from messages.stream import StepBatch, TokenEvent
from messages.transfer import (
    Endpoint,
    KVSpec,
    KVTransferError,
    KVTransferTimeout,
    TransferHandle,
)

__all__ = [
    "Endpoint",
    "EngineStats",
    "KVSpec",
    "KVTransferError",
    "KVTransferTimeout",
    "PoolState",
    "PrefillAborted",
    "PrefillFailed",
    "PrefillResult",
    "PrefillTask",
    "StepBatch",
    "TokenEvent",
    "TokenLogprobs",
    "TransferHandle",
    "WorkerStats",
]
