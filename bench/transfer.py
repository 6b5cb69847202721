"""`pdserve bench transfer`: one request's KV moved between two workers, by each CPU path.

Paths, each for a request's KV of 1, 8 and 64 MiB (1 MiB blocks of float32):

- ``ray-node``: the object store, sender and receiver on one Ray node (shared memory);
- ``ray-cross``: the object store across two Ray nodes (Ray copies between stores);
- ``gloo-node`` / ``gloo-cross``: the collective backend (gloo over TCP), same pairs;
- ``memcpy``: one plain copy of the same bytes (torch, one thread): the baseline.

The nodes are a ``ray.cluster_utils.Cluster`` on this machine (a head and a second node,
each its own raylet and object store), so "cross" means two object stores, not two
hosts: Ray's transfer between them runs over loopback. A transfer is timed as the real
backends do it -- the sender's gather and send, then the receiver's fetch and its
scatter into the reserved blocks -- and every transfer's bytes are checked. Each figure
is the median of ``runs`` runs after one warm-up, as GB/s and as a fraction of memcpy.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK_SHAPE = (32, 2, 16, 4, 64)  # 1 MiB of float32 per block
MIB = 1 << 20
PATHS = ("ray-node", "ray-cross", "gloo-node", "gloo-cross")


@dataclass(frozen=True)
class TransferConfig:
    sizes_mib: tuple[int, ...] = (1, 8, 64)
    runs: int = 5
    store_mib: int = 300  # each node's object store
    out: Path | None = Path("bench/results/transfer-cpu.json")
    paths: tuple[str, ...] = field(default=PATHS)


def memcpy_seconds(nbytes: int, runs: int) -> float:
    import torch

    torch.set_num_threads(1)
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm: pages mapped
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def run(cfg: TransferConfig) -> dict[str, Any]:
    import ray
    from ray.cluster_utils import Cluster

    store = cfg.store_mib * MIB
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": store, "resources": {"bench_a": 4},
        "include_dashboard": False})
    cluster.add_node(num_cpus=1, object_store_memory=store, resources={"bench_b": 4})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        return _measure(cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()


def _measure(cfg: TransferConfig) -> dict[str, Any]:
    import ray

    from bench.transfer_actors import TransferEnd

    blocks = max(cfg.sizes_mib) + 1
    backends = tuple(sorted({"ray" if p.startswith("ray") else "collective" for p in cfg.paths}))

    def end(node: str) -> Any:
        return TransferEnd.options(resources={node: 1}).remote(backends, BLOCK_SHAPE, blocks)

    sender, near, far = end("bench_a"), end("bench_a"), end("bench_b")
    nodes = ray.get([a.node_id.remote() for a in (sender, near, far)])
    assert nodes[0] == nodes[1] != nodes[2], nodes
    dests = {"node": near, "cross": far}
    rows: list[dict[str, Any]] = []
    for mib in cfg.sizes_mib:
        nbytes = mib * MIB
        ids = list(range(mib))
        base = memcpy_seconds(nbytes, cfg.runs)
        row: dict[str, Any] = {"mib": mib, "memcpy_gbps": round(_gbps(nbytes, base), 3)}
        for path in cfg.paths:
            kind, where = path.split("-")
            recv = dests[where]
            ep = ray.get(recv.endpoint.remote("ray" if kind == "ray" else "collective"))
            times = []
            for i in range(cfg.runs + 1):
                handle, send_s = ray.get(sender.send.remote(ep, ids, f"{path}-{mib}-{i}"))
                recv_s, got = ray.get(recv.receive.remote(handle, ids))
                want = ray.get(sender.checksum.remote(ids))
                if abs(got - want) > 1e-3 * max(1.0, abs(want)):
                    raise AssertionError(f"{path} {mib} MiB: wrong bytes ({got} vs {want})")
                if i:  # the first run warms up (pages, the collective pair's group)
                    times.append(send_s + recv_s)
            med = statistics.median(times)
            row[f"{path}_gbps"] = round(_gbps(nbytes, med), 3)
            row[f"{path}_of_memcpy"] = round(base / med, 3)
            row[f"{path}_ms"] = round(med * 1e3, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "command": "pdserve bench transfer " + f"--runs {cfg.runs} --sizes "
                   + " ".join(str(s) for s in cfg.sizes_mib),
        "machine": f"{platform.machine()} {os.cpu_count()} cores (a 2-core VM, shared with "
                   "other jobs while measured: contended)",
        "what": "one request's KV (1 MiB float32 blocks): sender gather+send, receiver "
                "fetch+scatter; medians of `runs` runs after one warm-up; *_of_memcpy = "
                "memcpy time / path time",
        "runs": cfg.runs,
        "rows": rows,
    }
    if cfg.out is not None:
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        cfg.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    """The markdown table docs/benchmarks.md shows."""
    paths = [p for p in PATHS if f"{p}_gbps" in result["rows"][0]]
    head = "| KV size | memcpy GB/s | " + " | ".join(f"{p} GB/s (x memcpy)" for p in paths)
    lines = [head + " |", "|" + "---|" * (2 + len(paths))]
    for r in result["rows"]:
        cells = [f"{r[f'{p}_gbps']:.2f} ({r[f'{p}_of_memcpy']:.2f})" for p in paths]
        lines.append(f"| {r['mib']} MiB | {r['memcpy_gbps']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
