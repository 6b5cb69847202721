"""Placement flags (--prefill-resources and friends) and node feasibility, without Ray."""

from __future__ import annotations

import asyncio

import pytest

from engine.config import ConfigError
from router.cli import parser
from router.config import RouterConfig
from router.errors import DeadlineExceeded, NoWorkersError
from router.node_resources import demand, parse_resources, unplaceable_reason
from router.settings import settings_from_args
from router.worker_registry import WorkerRegistry
from router.worker_spawn import worker_options


def _settings(*flags: str) -> RouterConfig:
    return settings_from_args(parser().parse_args(["serve", *flags])).router


def test_flags_give_each_role_its_resources() -> None:
    rc = _settings("--prefill-resources", '{"compute_node": 1}',
                   "--decode-resources", '{"memory_node": 0.5, "big": 2}')
    assert rc.prefill_resources == {"compute_node": 1.0}
    assert rc.decode_resources == {"memory_node": 0.5, "big": 2.0}
    assert rc.colocated_resources == {}
    assert worker_options(rc, "prefill")["resources"] == {"compute_node": 1.0}
    assert worker_options(rc, "decode") == {"num_cpus": 1,
                                            "resources": {"memory_node": 0.5, "big": 2.0}}
    assert "resources" not in worker_options(rc, "colocated")


@pytest.mark.parametrize(("text", "says"), [
    ("not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"x": 0}', "positive"),
    ('{"x": -1}', "positive"),
    ('{"x": "1"}', "positive"),
    ('{"x": true}', "positive"),
    ('{"x": 1.5}', "whole numbers"),
    ('{"CPU": 1}', "Ray's own"),
    ('{"node:10.0.0.1": 1}', "Ray's own"),
    ('{"": 1}', "non-empty"),
])
def test_bad_resources_flag_is_a_config_error_naming_it(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as e:
        _settings("--decode-resources", text)
    assert "decode" in str(e.value)


def test_config_file_values_are_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"RouterConfig\.prefill_resources"):
        RouterConfig(prefill_resources={"x": float("nan")})
    assert RouterConfig(colocated_resources={"a": 1}).worker_resources("colocated") == {
        "a": 1.0}


def test_demand_uses_the_names_ray_nodes_reports() -> None:
    assert demand({"num_cpus": 2, "resources": {"p": 1.0}}) == {"CPU": 2.0, "p": 1.0}
    assert demand({"num_gpus": 0.5, "num_cpus": 1}) == {"GPU": 0.5, "CPU": 1.0}
    assert parse_resources("--x", '{"a": 3}') == {"a": 3.0}


def _node(alive: bool, **res: float) -> dict[str, object]:
    return {"NodeID": "n", "Alive": alive, "Resources": res}


def test_unplaceable_only_when_no_alive_node_covers_the_demand() -> None:
    need = {"CPU": 1.0, "decode_node": 1.0}
    assert unplaceable_reason("decode", need, [_node(True, CPU=4, decode_node=2)]) is None
    # The node that had it is dead; the alive one lacks the custom resource.
    nodes = [_node(False, CPU=4, decode_node=2), _node(True, CPU=8, prefill_node=1)]
    why = unplaceable_reason("decode", need, nodes)
    assert why is not None and "decode worker" in why and "decode_node=1" in why
    # Enough of the custom resource but too few CPUs on that node.
    assert unplaceable_reason("decode", {"CPU": 2.0, "decode_node": 1.0},
                              [_node(True, CPU=1, decode_node=1)]) is not None


def test_unplaceable_role_fails_new_requests_at_once_and_keeps_replaced_ones_waiting(
        ) -> None:
    async def go() -> tuple[str, str]:
        registry = WorkerRegistry(RouterConfig(worker_wait_s=60))
        registry._starting["decode"] = 1  # a replacement pending in Ray
        registry.unplaceable["decode"] = "no alive Ray node can host a decode worker (x)"
        loop = asyncio.get_running_loop()
        with pytest.raises(NoWorkersError) as new:  # a first attempt: at once
            await registry.wait_live("decode", loop.time() + 30)
        waiter = asyncio.ensure_future(  # a request placed again: waits for capacity
            registry.wait_live("decode", loop.time() + 0.3, fail_fast=False))
        await asyncio.sleep(0.1)
        assert not waiter.done()
        with pytest.raises(DeadlineExceeded) as later:  # ... until its deadline
            await waiter
        return str(new.value), str(later.value)

    new, later = asyncio.run(go())
    assert "no alive Ray node can host a decode worker" in new
    assert "no alive Ray node can host a decode worker" in later
