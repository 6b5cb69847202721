"""pdserve across Ray nodes: a head and labelled nodes on this machine (each node its own
raylet and object store), prefill workers on one node and decode workers on another.

- Placement: --prefill-resources / --decode-resources put each role on its nodes; the
  KV crosses nodes (``--kv-transfer auto``: gloo between nodes); greedy output equals
  the offline engine's token for token; GetServerInfo's workers carry their node.
- Node loss: the decode node's raylet is killed while requests stream. The router
  counts the loss (pdserve_workers_lost_total{role="decode",reason="node_lost"}), no
  node can host a decode worker, so health is NOT_SERVING and new calls are UNAVAILABLE
  with the reason; a decode node joins, the replacement starts there, and every request
  that was streaming finishes with exactly the offline engine's tokens (none lost).
- GPU pairs (cuda-ipc): the placement group puts each prefill/decode pair on one GPU of
  a node that declares GPUs, and a replacement takes its predecessor's bundle.

The model is a tiny random-weight one (dummy:tiny-llama3, token-id prompts): each
node loss loads a worker again, and the real checkpoint's load on a shared 2-core
machine would take most of this module's time without testing anything more here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import grpc
import pytest
import ray
from grpc_health.v1 import health

from engine import LLM
from engine.sampling_params import SamplingParams
from router import wire
from router.config import RouterConfig
from router.errors import NoWorkersError
from router.gpu_pairs import GpuPairs, wants_pairs
from router.metrics import WorkerCollector
from router.request_state import Delta, Final
from router.server import HealthReporter
from router.status import status_for
from router.worker_handle import WorkerHandle
from tests.e2e.multinode_fixtures import (
    DECODE_NODE,
    PREFILL_NODE,
    STORE_BYTES,
    SimCluster,
    wait_until,
)
from tests.e2e.runtime_fixtures import RouterHarness, assert_clean, router_config

MODEL = "dummy:tiny-llama3"
PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# Long enough that the node is killed mid-stream: a tiny model decodes hundreds of
# tokens a second, and removing a node takes a moment (200 was not always enough).
LONG = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)
N = 4  # requests in flight
# Varied token-id prompts of 20..41 tokens (vocab 512; 0-2 are special).
PROMPTS = [[(i * 37 + k * 11) % 500 + 3 for k in range(20 + i * 7)] for i in range(N)]


class Deployment:
    def __init__(self) -> None:
        self.sim = SimCluster()
        self.prefill_node = self.sim.add(PREFILL_NODE)
        self.decode_node = self.sim.add(DECODE_NODE)
        cfg = router_config(
            prefill_resources={PREFILL_NODE: 1}, decode_resources={DECODE_NODE: 1},
            worker_wait_s=300, transfer_timeout_s=10)
        self.h = RouterHarness(replace(cfg, engine=replace(cfg.engine, model=MODEL)))

    def close(self) -> None:
        try:
            self.h.close()
        finally:
            self.sim.close()

    def worker(self, role: str) -> WorkerHandle:
        live = self.h.router.registry.live(role)
        assert len(live) == 1, live
        return live[0]


@pytest.fixture(scope="module")
def dep() -> Iterator[Deployment]:
    d = Deployment()
    yield d
    d.close()


def _offline(params: SamplingParams) -> list[list[int]]:
    outs = [o.token_ids for o in LLM(model=MODEL).generate(PROMPTS, params)]
    # Distinct and varied (tokens depend on the whole context): a lost or misplaced KV
    # block would change them.
    assert len({tuple(t) for t in outs}) == N and all(len(set(t)) > 8 for t in outs)
    return outs


@pytest.fixture(scope="module")
def want() -> list[list[int]]:
    return _offline(PARAMS)


@pytest.fixture(scope="module")
def want_long() -> list[list[int]]:
    return _offline(LONG)


def test_prefill_and_decode_on_their_nodes_equal_llm(dep: Deployment,
                                                     want: list[list[int]]) -> None:
    p, d = dep.worker("prefill"), dep.worker("decode")
    assert p.node is not None and d.node is not None
    assert p.node.node_id == dep.prefill_node.node_id
    assert d.node.node_id == dep.decode_node.node_id
    outs = dep.h.generate_all(PROMPTS, PARAMS)
    assert [t for t, _ in outs] == want
    assert all(f.usage.completion_tokens == PARAMS.max_tokens for _, f in outs)
    info = wire.worker_info(d)  # what GetServerInfo and `pdserve info` show
    assert (info.node_id, info.node_address) == (d.node.node_id, d.node.node_address)
    assert_clean(dep.h)


def _lost(dep: Deployment) -> dict[tuple[str, ...], float]:
    for family in WorkerCollector(dep.h.router).collect():
        if family.name == "pdserve_workers_lost":
            return {tuple(s.labels.values()): s.value for s in family.samples
                    if s.name.endswith("_total")}
    return {}


def _stream_all(dep: Deployment, progress: list[int]
                ) -> list[Future[tuple[list[int], Final]]]:
    async def one(i: int, prompt: list[int]) -> tuple[list[int], Final]:
        toks: list[int] = []
        async for item in dep.h.router.generate(prompt, LONG):
            if isinstance(item, Delta):
                toks += item.token_ids
                progress[i] = len(toks)
            else:
                return toks, item
        raise AssertionError("the stream ended without a Final")

    loop = dep.h.lt.loop
    return [asyncio.run_coroutine_threadsafe(one(i, p), loop)
            for i, p in enumerate(PROMPTS)]


def _health(dep: Deployment) -> HealthReporter:
    async def make() -> HealthReporter:
        return HealthReporter(dep.h.router, health.aio.HealthServicer())

    return dep.h.lt.run(make())


def test_decode_node_lost_then_a_node_joins_no_request_lost(
        dep: Deployment, want_long: list[list[int]]) -> None:
    registry = dep.h.router.registry
    lost_before = _lost(dep).get(("decode", "node_lost"), 0.0)
    progress = [0] * N
    futures = _stream_all(dep, progress)
    # Every request past its first token: streaming from the decode worker.
    wait_until(lambda: min(progress) >= 3, 120, "every request to stream", poll_s=0.005)
    assert max(progress) < LONG.max_tokens
    dep.sim.remove(dep.decode_node)

    wait_until(lambda: "decode" in registry.unplaceable, 60, "the decode role unplaceable")
    reporter = _health(dep)
    assert not reporter.serving()
    assert DECODE_NODE in reporter.reason()
    with pytest.raises(NoWorkersError) as e:  # a new call: refused at once, with why
        dep.h.lt.run(dep.h.collect(PROMPTS[0], PARAMS), timeout=60)
    status = status_for(e.value)
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert DECODE_NODE in status.message and "no alive Ray node" in status.message
    wait_until(lambda: _lost(dep).get(("decode", "node_lost"), 0.0) == lost_before + 1, 30,
               "the loss counted")
    # The streaming requests wait for capacity.
    ended = {i: (f.exception() or f.result()[1]) for i, f in enumerate(futures) if f.done()}
    assert not ended, (ended, progress)

    new_node = dep.sim.add(DECODE_NODE)
    wait_until(lambda: bool(registry.live("decode")), 300, "a decode worker on the new node")
    d = dep.worker("decode")
    assert d.node is not None and d.node.node_id == new_node.node_id
    assert "decode" not in registry.unplaceable
    assert reporter.serving()
    outs = [f.result(timeout=300) for f in futures]
    assert [t for t, _ in outs] == want_long
    assert all(f.finish_reason == "length" for _, f in outs)
    dep.decode_node = new_node
    assert_clean(dep.h)


@pytest.mark.slow
def test_decode_node_lost_with_a_spare_node_requests_move_there(
        dep: Deployment, want_long: list[list[int]]) -> None:
    registry = dep.h.router.registry
    spare = dep.sim.add(DECODE_NODE)
    progress = [0] * N
    futures = _stream_all(dep, progress)
    wait_until(lambda: min(progress) >= 3, 120, "every request to stream", poll_s=0.005)
    dep.sim.remove(dep.decode_node)
    assert not all(f.done() for f in futures)  # killed mid-stream
    outs = [f.result(timeout=300) for f in futures]
    assert [t for t, _ in outs] == want_long
    d = dep.worker("decode")
    assert d.node is not None and d.node.node_id == spare.node_id
    assert "decode" not in registry.unplaceable
    dep.decode_node = spare
    assert_clean(dep.h)


@ray.remote
class _Probe:
    """Stands where a worker would: reports the node and the GPU Ray gave it."""

    def where(self) -> tuple[str, list[str]]:
        return (ray.get_runtime_context().get_node_id(),
                [str(g) for g in ray.get_gpu_ids()])


def test_gpu_pairs_share_a_gpu_and_a_replacement_takes_its_bundle(dep: Deployment) -> None:
    # A node that declares two GPUs (Ray assigns GPU ids by count; nothing here touches
    # CUDA): the placement group for 2 prefill + 2 decode at 0.5 GPU each must put each
    # pair on one GPU, the two pairs on the two GPUs.
    gpu_node = dep.sim.cluster.add_node(num_cpus=4, num_gpus=2,
                                        object_store_memory=STORE_BYTES)
    dep.sim.cluster.wait_for_nodes()
    cfg = RouterConfig(prefill_workers=2, decode_workers=2, gpus_per_worker=0.5)
    assert wants_pairs(cfg, cfg.resolved_kv_transfer())  # auto picks cuda-ipc here
    pairs = GpuPairs(cfg)
    try:
        dep.h.lt.run(pairs.create(), timeout=120)

        def spawn(role: str) -> tuple[int | None, Any]:
            bundle, opts = pairs.take(role)
            return bundle, _Probe.options(num_gpus=0.5, num_cpus=1, **opts).remote()

        placed = {(role, i): spawn(role) for i in range(2) for role in ("prefill", "decode")}
        where = {k: ray.get(a.where.remote(), timeout=60) for k, (_, a) in placed.items()}
        assert {node for node, _ in where.values()} == {gpu_node.node_id}
        for i in range(2):
            assert where[("prefill", i)][1] == where[("decode", i)][1]  # one GPU per pair
        assert where[("prefill", 0)][1] != where[("prefill", 1)][1]

        bundle, actor = placed[("prefill", 0)]  # prefill 0 dies; its replacement ...
        ray.kill(actor, no_restart=True)
        pairs.give_back("prefill", bundle)
        again, replacement = spawn("prefill")
        assert again == bundle  # ... lands in its bundle, next to decode 0
        assert ray.get(replacement.where.remote(), timeout=60)[1] == where[("decode", 0)][1]
    finally:
        pairs.remove()
        dep.sim.remove(gpu_node)
