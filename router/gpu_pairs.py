"""Prefill/decode pairs on one GPU: a Ray placement group for ``cuda-ipc``.

cuda-ipc moves KV in place only between workers that share a GPU (kvtransfer/
pairing.py; any other pair falls back to NCCL). Left to itself Ray may put prefill 0
and decode 0 on two GPUs, or two nodes. With fractional GPUs (2 x gpus_per_worker <= 1)
the registry therefore reserves one placement-group bundle per pair
(runtime.config.pair_on_gpus): a bundle lives on one node, and Ray takes a bundle's
GPU fraction from a single GPU, so the two workers scheduled into it share that GPU.
Workers beyond the pairs get a bundle of their own. Each bundle also carries the custom
resources its workers ask for (--prefill-resources / --decode-resources).

Bundles are *slots*: a worker takes a free slot of its role when it is spawned and
gives it back when it is lost, drained or retired, so its replacement lands in the same
bundle -- next to its partner. When a node dies Ray reschedules the group's bundles that
were on it onto nodes with room; a replacement waits for its bundle like any pending
actor (the registry's capacity watch covers it).
"""

from __future__ import annotations

import itertools
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from router.config import RouterConfig
from runtime.config import pair_on_gpus

_groups = itertools.count()  # names stay unique across routers in one Ray


def wants_pairs(config: RouterConfig, kv_transfer: str) -> bool:
    """Pairs on one GPU pay off only for cuda-ipc with GPU fractions two can share."""
    return (config.mode == "disaggregated" and kv_transfer == "cuda-ipc"
            and config.gpus_per_worker > 0 and 2 * config.gpus_per_worker <= 1)


class GpuPairs:
    """The placement group and which of its bundles each role may use."""

    def __init__(self, config: RouterConfig) -> None:
        plan = pair_on_gpus(config.prefill_workers, config.decode_workers,
                            config.gpus_per_worker, cpus_per_worker=1)
        bundles = [dict(b) for b in plan.bundles]
        self.free: dict[str, list[int]] = {"prefill": [], "decode": []}
        for (role, _), b in sorted(plan.bundle_of.items(), key=lambda kv: kv[0][1]):
            self.free[role].append(b)
            for name, qty in config.worker_resources(role).items():
                bundles[b][name] = bundles[b].get(name, 0.0) + qty
        self.bundles = bundles
        self.group: PlacementGroup | None = None
        self._name = f"pdserve-pairs-{id(config):x}-{next(_groups)}"

    async def create(self) -> None:
        """Reserve the bundles (PACK: on as few nodes as fit). Waits until Ray has placed
        them -- like a pending actor, until nodes with the resources exist."""
        self.group = placement_group(self.bundles, strategy="PACK", name=self._name)
        await self.group.ready()

    def take(self, role: str) -> tuple[int | None, dict[str, Any]]:
        """A free bundle of ``role`` and the actor options that schedule into it; (None,
        {}) when none is free (more workers of the role than planned: Ray places it)."""
        if self.group is None or not self.free[role]:
            return None, {}
        b = self.free[role].pop(0)
        return b, {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.group, placement_group_bundle_index=b)}

    def give_back(self, role: str, bundle: int | None) -> None:
        if bundle is not None:
            self.free[role].append(bundle)
            self.free[role].sort()

    def remove(self) -> None:
        if self.group is not None and ray.is_initialized():
            remove_placement_group(self.group)
        self.group = None
