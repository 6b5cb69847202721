"""A deployment whose prefill and decode workers resolve different KV layouts does not
start: the router asks each real worker actor for its spec as it comes up and refuses
the second (router/kv_spec_gate.py), instead of failing every request's transfer later.

The decode role is forced to an int8 cache, as a decode worker on another kind of node
would resolve "auto" differently; a tiny random-weight model keeps the loads short.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import ray

from engine.config import CacheConfig, EngineConfig
from router.config import RouterConfig
from router.core import Router
from router.errors import KVSpecMismatch
from tests.e2e.runtime_fixtures import LoopThread, ensure_ray


class _Int8Decode(RouterConfig):
    """Decode workers store int8 KV, prefill workers the model dtype (fp32 on CPU)."""

    def worker_engine(self, role: str) -> EngineConfig:
        engine = super().worker_engine(role)
        if role != "decode":
            return engine
        return dataclasses.replace(
            engine, cache=dataclasses.replace(engine.cache, kv_cache_dtype="int8"))


def test_workers_with_different_kv_layouts_refuse_to_start() -> None:
    ensure_ray()
    engine = EngineConfig(model="dummy:tiny-smollm2-like",
                          cache=CacheConfig(memory_bytes=4 << 20))
    router = Router(_Int8Decode(engine=engine, worker_wait_s=5.0))
    lt = LoopThread()
    try:
        with pytest.raises(KVSpecMismatch) as err:
            lt.run(router.start(), timeout=240)
        msg = str(err.value)
        assert "prefill-0" in msg and "decode-1" in msg, msg
        # Both specs, resolved by the workers themselves: rows of head_dim 16, or of 16
        # one-byte values and a 4-byte scale.
        assert "float32 KV, blocks of (2, 2, 16, 2, 16)" in msg, msg
        assert "int8 KV (fp32-per-token-head scales), blocks of (2, 2, 16, 2, 20)" in msg
        admitted = [h.actor for h in router.registry.workers.values()]
        assert len(admitted) == 1  # the first up; the other was killed
        lt.run(router.shutdown())
        for actor in admitted:  # what `pdserve serve` does next: no worker outlives it
            # ray.kill only asks: a call sent right after it may still be answered (seen
            # under load), so ask until the actor is gone -- within a bound.
            with pytest.raises(ray.exceptions.RayActorError):
                for _ in range(300):
                    ray.get(actor.ping.remote(), timeout=30)
                    time.sleep(0.1)
    finally:
        lt.close()
