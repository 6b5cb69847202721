"""The router refuses prefill and decode workers whose KV caches store blocks differently
(router/kv_spec_gate.py): at startup the start fails naming both workers and specs; a
replacement that differs is never admitted, is counted lost, and its reason reaches new
requests. In-process fake workers (tests/unit/router_fakes.py): no Ray, no model.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from messages import KVSpec
from router.config import RouterConfig
from router.core import Router
from router.errors import KVSpecMismatch, NoWorkersError
from router.kv_spec_gate import KVSpecGate
from router.wire import worker_info
from router.worker_handle import WorkerHandle
from tests.unit.router_fakes import SPEC, FakeCluster
from tests.unit.test_router_lifecycle import PROMPT, collect, expected, run, start, until
from tests.unit.test_router_lifecycle import cluster as cluster  # the fixture

__all__ = ["cluster"]

# The fakes' spec as an int8 cache stores it: one-byte values, rows of head_dim + 4.
INT8 = KVSpec((1, 2, 16, 1, 12), "int8", 1, "fp32-per-token-head")


def test_differences_name_each_field_that_differs() -> None:
    assert SPEC.differences(INT8) == ["dtype float32 vs int8",
                                      "scales none vs fp32-per-token-head", "row 8 vs 12"]
    assert SPEC.differences(SPEC) == []
    other = KVSpec((1, 2, 32, 1, 8), "float32", 4)
    assert SPEC.differences(other) == ["block tokens 16 vs 32"]


def test_a_start_with_mismatched_specs_fails_naming_both(cluster: FakeCluster) -> None:
    async def go() -> None:
        cluster.kv_specs["decode"] = INT8
        router = Router(RouterConfig())
        with pytest.raises(KVSpecMismatch) as err:
            await router.start()
        msg = str(err.value)
        # Whichever came up first set the deployment's spec; the other is refused.
        assert "prefill-0" in msg and "decode-1" in msg, msg
        assert SPEC.describe() in msg and INT8.describe() in msg, msg
        assert "dtype" in msg and "scales" in msg and "row" in msg, msg
        # The refused one is named first, and is stopped; the admitted one is not.
        refused = "decode-1" if msg.index("decode-1") < msg.index("prefill-0") else "prefill-0"
        assert [a.dead for a in cluster.actors] == [refused == "prefill-0",
                                                    refused == "decode-1"]
        role = refused.split("-")[0]
        assert router.registry.lost == {(role, "kv_spec_mismatch"): 1}
        await router.shutdown()  # what `pdserve serve` does before it exits
        assert all(a.dead for a in cluster.actors)
    run(go())


def test_a_failed_start_stops_the_workers_still_loading(cluster: FakeCluster) -> None:
    async def go() -> None:
        # Two decode workers: decode-1 (int8) is refused while decode-2 is still starting.
        cluster.kv_specs["decode"] = INT8
        cluster.ready.clear()  # nobody answers its first ping yet
        task = asyncio.ensure_future(start(cluster, decode_workers=2))
        await until(lambda: len(cluster.actors) == 3, "three actors made")
        starting = cluster.actors[2]

        async def never() -> KVSpec:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")
        starting._kv_spec = never  # type: ignore[method-assign]
        cluster.ready.set()
        with pytest.raises(KVSpecMismatch):
            await task
        assert starting.dead
    run(go())


def test_a_replacement_with_another_spec_is_not_admitted(
        cluster: FakeCluster, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("router.worker_registry.REPLACE_BACKOFF_S", (0.05,) * 5)

    async def go() -> None:
        router = await start(cluster)
        reg = router.registry
        cluster.kv_specs["decode"] = INT8  # the replacement lands on a node unlike the first
        with caplog.at_level(logging.ERROR, logger="router.worker_registry"):
            cluster.live("decode")[0].die()
            await until(lambda: reg.lost[("decode", "kv_spec_mismatch")] >= 1, "refused")
        assert not reg.live("decode")
        refused = cluster.actors[2]
        assert refused.worker_id == "decode-2" and refused.dead
        # The first worker's loss is counted by a task of its own (it asks Ray whether
        # the node is gone), which may finish after the refusal's count.
        # (node_lost or actor_died: whether Ray's node table lists the fake's node
        # depends on what ran before in this process.)
        await until(lambda: reg.lost[("decode", "actor_died")]
                    + reg.lost[("decode", "node_lost")] == 1, "the death counted")
        logged = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert logged and "decode-2" in logged[0] and "prefill-0" in logged[0]
        assert INT8.describe() in logged[0] and SPEC.describe() in logged[0]
        # While none is live, a new request fails at once, and says why.
        await until(lambda: "decode" in reg.refused, "reason recorded")
        with pytest.raises(NoWorkersError, match=r"KV layout mismatch.*decode-2"):
            await collect(router)
        # A later try that comes up matching is admitted, and serves.
        cluster.kv_specs["decode"] = SPEC
        await until(lambda: bool(reg.live("decode")), "a matching replacement")
        assert "decode" not in reg.refused
        toks, _ = await collect(router)
        assert toks == expected(PROMPT, 12)
        await router.shutdown()
    run(go())


def test_colocated_workers_exchange_no_kv_and_are_not_checked(cluster: FakeCluster) -> None:
    async def go() -> None:
        cluster.kv_specs["colocated"] = INT8
        router = await start(cluster, mode="colocated", workers=1)
        assert router.registry.live("colocated")
        await router.shutdown()
    run(go())


def test_server_info_shows_each_workers_kv_spec(cluster: FakeCluster) -> None:
    async def go() -> None:
        router = await start(cluster)
        for h in router.registry.workers.values():
            info = worker_info(h)
            assert (info.kv_dtype, info.kv_scales) == ("float32", "")
            assert list(info.kv_block_shape) == [1, 2, 16, 1, 8]
        await router.shutdown()
    run(go())


def test_serve_exits_non_zero_with_the_message(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    from router import cli, service
    from router.server_config import ServerConfig
    from router.settings import Settings

    why = "KV layout mismatch: decode worker decode-1 stores int8 KV ..."

    class _Service:
        stopped = False

        def __init__(self, *_args: object) -> None:
            pass

        async def start(self) -> None:
            raise KVSpecMismatch(why)

        async def stop(self) -> None:
            _Service.stopped = True

    monkeypatch.setattr(service, "Service", _Service)
    monkeypatch.setattr(cli, "init_ray", lambda _rc: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    status = asyncio.run(cli.serve(Settings(RouterConfig(), ServerConfig()),
                                   keep_serving=False))
    assert status == 1 and _Service.stopped
    assert capsys.readouterr().err == f"pdserve serve: {why}\n"


def test_the_refusal_names_a_live_peer_of_the_other_role_else_the_first() -> None:
    async def go() -> None:
        def handle(wid: str, role: str, spec: KVSpec) -> WorkerHandle:
            h = WorkerHandle(wid, role, actor=None)
            h.kv_spec = spec
            return h

        gate = KVSpecGate()
        p0, d1, d2 = (handle("prefill-0", "prefill", SPEC), handle("decode-1", "decode", SPEC),
                      handle("decode-2", "decode", SPEC))
        for h in (p0, d1, d2):
            gate.admit(h, [p0, d1, d2])
        bad = handle("decode-3", "decode", INT8)
        with pytest.raises(KVSpecMismatch, match="but prefill worker prefill-0 stores"):
            gate.admit(bad, [d1, d2, p0])  # the pair whose transfers would fail
        p0.alive = False
        with pytest.raises(KVSpecMismatch, match="but decode worker decode-1 stores"):
            gate.admit(bad, [d1, d2, p0])
        with pytest.raises(KVSpecMismatch, match=r"but worker prefill-0 \(gone now\)"):
            gate.admit(bad, [])
        gate.admit(handle("colocated-9", "colocated", INT8), [])  # exchanges no KV
        gate.admit(handle("prefill-4", "prefill", SPEC), [])
    run(go())
