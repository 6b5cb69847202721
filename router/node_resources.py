"""Custom Ray resources per role, and whether any node of the cluster can host a worker.

Operators label nodes with ``ray start --resources '{"prefill_node": 4}'`` (or KubeRay's
``rayStartParams``); ``--prefill-resources '{"prefill_node": 1}'`` then makes every
prefill worker ask for one unit of it, so Ray places prefill workers on those nodes only.

Feasibility is judged from the nodes' *total* resources (``ray.nodes()``, which the GCS
answers without a dashboard): a worker whose demand no alive node covers would wait in
Ray forever, so the registry reports that role as unplaceable -- health NOT_SERVING and
new calls UNAVAILABLE with the reason -- instead of letting requests wait for it. A node
that has the resources but has lent them all to other actors is *not* unplaceable: the
worker starts once they are free, and requests wait for it within their bounds.

Ray-free (the registry passes ``ray.nodes()`` in), so it is unit-tested without a cluster.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from engine.config import ConfigError

# Ray's own resource names: they have their own options (num_cpus, num_gpus, memory) or
# are set by Ray per node; ``.options(resources=...)`` refuses them.
RESERVED = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def check_resources(where: str, value: Any) -> dict[str, float]:
    """A role's custom resources as Ray takes them: name -> positive quantity (a
    fraction up to 1, or a whole number). ConfigError naming ``where`` otherwise."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a JSON object of resource name -> positive "
                          f"number, e.g. {{\"prefill_node\": 1}}; got {value!r}")
    out: dict[str, float] = {}
    for name, qty in value.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}: resource names must be non-empty strings, got "
                              f"{name!r}")
        if name in RESERVED or name.startswith("node:"):
            raise ConfigError(f"{where}: {name!r} is Ray's own resource; name a custom "
                              "resource the nodes declare with `ray start --resources`")
        if isinstance(qty, bool) or not isinstance(qty, (int, float)) \
                or not math.isfinite(qty) or qty <= 0:
            raise ConfigError(f"{where}: {name!r} must be a positive number, got {qty!r}")
        if qty > 1 and qty != int(qty):  # Ray: fractions only up to 1
            raise ConfigError(f"{where}: {name!r} = {qty!r}: quantities above 1 must be "
                              "whole numbers")
        out[name] = float(qty)
    return out


def parse_resources(flag: str, text: str) -> dict[str, float]:
    """A --*-resources flag's JSON text, checked."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag}: not valid JSON ({e.msg}): {text!r}") from None
    return check_resources(flag, value)


def demand(ray_options: Mapping[str, Any]) -> dict[str, float]:
    """What one actor created with these ``.options(...)`` needs of one node, in the
    names ``ray.nodes()`` reports (num_cpus -> CPU, num_gpus -> GPU)."""
    need: dict[str, float] = {}
    if ray_options.get("num_cpus"):
        need["CPU"] = float(ray_options["num_cpus"])
    if ray_options.get("num_gpus"):
        need["GPU"] = float(ray_options["num_gpus"])
    need.update(ray_options.get("resources") or {})
    return need


def fits(need: Mapping[str, float], node_total: Mapping[str, float]) -> bool:
    return all(node_total.get(name, 0.0) >= qty for name, qty in need.items())


def unplaceable_reason(role: str, need: Mapping[str, float],
                       nodes: Sequence[Mapping[str, Any]]) -> str | None:
    """None if some alive node's total resources cover ``need``; otherwise why not, for
    the operator (and the UNAVAILABLE a client gets). ``nodes`` is ``ray.nodes()``."""
    alive = [n for n in nodes if n.get("Alive")]
    if any(fits(need, n.get("Resources") or {}) for n in alive):
        return None
    wanted = ", ".join(f"{k}={v:g}" for k, v in sorted(need.items()))
    return (f"no alive Ray node can host a {role} worker (it needs {wanted}; "
            f"{len(alive)} node(s) alive); it starts when a node that offers these joins")
