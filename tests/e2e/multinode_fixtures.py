"""A Ray cluster of several nodes on this one machine, for the multi-node tests.

``ray.cluster_utils.Cluster`` starts each node as its own raylet with its own object
store, so KV sent from a worker on one node to a worker on another crosses object stores
as it would across machines. Nodes are labelled with custom resources, as operators do
with ``ray start --resources``; the router's --prefill-resources / --decode-resources
put each role on its nodes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray
from ray.cluster_utils import Cluster

STORE_BYTES = 100 << 20  # per node: Ray's minimum is 75 MiB, one request's KV is < 1 MiB
PREFILL_NODE = "pd_prefill_node"
DECODE_NODE = "pd_decode_node"
# Ray marks a node whose raylet stops answering dead after period x threshold; the
# defaults take tens of seconds, these a couple.
FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                   "health_check_initial_delay_ms": 0}


class SimCluster:
    """A head (no worker resources: the router runs there, as a driver) and labelled
    nodes added and removed by the tests."""

    def __init__(self) -> None:
        if ray.is_initialized():  # a local Ray left by another test module
            ray.shutdown()
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "object_store_memory": STORE_BYTES, "include_dashboard": False,
            "_system_config": FAST_NODE_DEATH})
        ray.init(address=self.cluster.address, log_to_driver=False)

    def add(self, label: str, cpus: int = 1) -> Any:
        """A node offering ``cpus`` CPUs and ``cpus`` units of ``label``."""
        node = self.cluster.add_node(num_cpus=cpus, resources={label: cpus},
                                     object_store_memory=STORE_BYTES)
        self.cluster.wait_for_nodes()
        return node

    def remove(self, node: Any) -> None:
        """Its raylet and every process on it are killed (allow_graceful=False: no drain,
        as when a machine vanishes)."""
        self.cluster.remove_node(node, allow_graceful=False)

    def close(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()


def wait_until(cond: Callable[[], bool], timeout: float, what: str,
               poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)
