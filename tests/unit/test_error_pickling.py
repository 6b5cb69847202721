"""Typed errors cross process boundaries (raised in a worker, pickled by Ray, raised
again in the router): each must rebuild from its pickle with its type, message and
fields, or Ray replaces it and the client gets INTERNAL instead of its status."""

from __future__ import annotations

import pickle

import pytest
import ray.cloudpickle

from engine.errors import InvalidRequestError, RequestNotFoundError
from engine.sampling_params import SamplingParamsError
from engine.weights.errors import ModelSourceError, WeightLoadError
from messages import KVTransferError, KVTransferTimeout, PrefillAborted, PrefillFailed
from router.errors import (
    KVSpecMismatch,
    NoWorkersError,
    OverloadedError,
    QueueFullError,
    RequestFailedError,
    TransferFailed,
    WorkerLost,
)

ERRORS = [
    InvalidRequestError("max_tokens", "needs 438 KV blocks but the cache has 363"),
    SamplingParamsError("top_p", "must be in (0, 1]"),
    RequestNotFoundError("r-1"),
    ModelSourceError("no such model"),
    WeightLoadError("bad shard"),
    KVTransferError("lost"),
    KVTransferTimeout("late"),
    PrefillAborted("r@k.1 aborted"),
    PrefillFailed("NaN logits"),
    OverloadedError("full", 1.5),
    WorkerLost("decode-3"),
    QueueFullError("queue"),
    NoWorkersError("none"),
    RequestFailedError("failed"),
    TransferFailed("moved"),
    KVSpecMismatch("layout"),
]


@pytest.mark.parametrize("dumps,loads", [(pickle.dumps, pickle.loads),
                                         (ray.cloudpickle.dumps, ray.cloudpickle.loads)],
                         ids=["pickle", "cloudpickle"])
@pytest.mark.parametrize("err", ERRORS, ids=lambda e: type(e).__name__)
def test_a_typed_error_survives_pickling(err: Exception, dumps, loads) -> None:  # type: ignore[no-untyped-def]
    back = loads(dumps(err))
    assert type(back) is type(err) and str(back) == str(err)
    assert vars(back) == vars(err)
