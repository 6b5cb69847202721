"""The collective KV transport across two simulated Ray nodes (tests/e2e/
multinode_fixtures.py): the prefill worker on one node, the decode worker on another,
``--kv-transfer auto`` (ray+collective) picks gloo for that pair, bound to the node
addresses Ray reports; greedy output equal to the offline engine's, no block leaked.
Slow tier: a cluster and its workers take longer to start than the default tier allows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from engine import LLM
from engine.sampling_params import SamplingParams
from messages import PrefillTask
from tests.e2e.multinode_fixtures import DECODE_NODE, PREFILL_NODE, SimCluster
from tests.e2e.runtime_fixtures import RouterHarness, assert_clean, router_config

pytestmark = pytest.mark.slow

MODEL = "dummy:tiny-smollm2-like"
PARAMS = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = [[(i * 41 + k * 13) % 500 + 3 for k in range(24 + i * 9)] for i in range(6)]


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[SimCluster, RouterHarness]]:
    sim = SimCluster()
    try:
        sim.add(PREFILL_NODE)
        sim.add(DECODE_NODE)
        cfg = router_config(prefill_resources={PREFILL_NODE: 1},
                            decode_resources={DECODE_NODE: 1}, transfer_timeout_s=30)
        h = RouterHarness(replace(cfg, engine=replace(cfg.engine, model=MODEL)))
    except BaseException:
        sim.close()
        raise
    yield sim, h
    try:
        h.close()
    finally:
        sim.close()


def test_collective_across_nodes_equal_llm(two_nodes: tuple[SimCluster, RouterHarness]) -> None:
    _, h = two_nodes
    want = [o.token_ids for o in LLM(model=MODEL).generate(PROMPTS, PARAMS)]
    p = next(w for w in h.router.workers() if w.role == "prefill")
    d = next(w for w in h.router.workers() if w.role == "decode")
    assert p.node is not None and d.node is not None and p.node.node_id != d.node.node_id
    for _ in range(2):  # the second round reuses the pair's group
        outs = h.generate_all(PROMPTS, PARAMS)
        assert [t for t, _ in outs] == want
        assert all(f.usage.completion_tokens == PARAMS.max_tokens for _, f in outs)
    assert d.endpoint is not None and d.endpoint.backend == "ray+collective"
    assert d.endpoint.address.collective.host == d.node.node_address  # Ray's node IP
    assert_clean(h)


def test_auto_sends_across_nodes_through_collective(
        two_nodes: tuple[SimCluster, RouterHarness]) -> None:
    _, h = two_nodes
    p = next(w for w in h.router.workers() if w.role == "prefill")
    d = next(w for w in h.router.workers() if w.role == "decode")

    async def go() -> str:
        blocks = await d.actor.reserve.remote("per-pair", PROMPTS[0], PARAMS)
        assert blocks
        res = await p.actor.prefill.remote(
            PrefillTask("per-pair", PROMPTS[0], PARAMS, d.endpoint, blocks))
        await d.actor.start.remote("per-pair", res.first_token, res.handle)
        await d.actor.abort.remote("per-pair")
        return str(res.handle.backend)

    assert h.lt.run(go()) == "collective"
    assert_clean(h)
