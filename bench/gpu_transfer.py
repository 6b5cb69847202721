"""Step e: KV transfer through CUDA IPC between two Ray actors on one GPU.

Two actors of 0.5 GPU each, placed in one placement-group bundle by the pairing helper
(runtime.config.pair_on_gpus), each with a KV cache of the llama-3-8b layout (2 MiB
blocks, bf16). The decode side exports its cache (kvtransfer.cuda_ipc's endpoint); the
prefill side sends n = 1..128 random blocks (2-256 MiB) with ``CudaIpcSender.send``, the
production path, timed on the host from call to return (what the prefill worker waits
for). Next to it, in the sender's process on the same blocks: the same one-kernel block
copy within its own cache, and a plain contiguous device copy of as many bytes.
Bandwidths are payload bytes per second for all three. After each size the receiver's
blocks are compared with the sender's (float64 sums per block: a byte copy is exact).
On CPU (the dry run) the two sides are two caches in this process and the copy is
kvtransfer.block_copy's torch path.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from bench.gpu_common import StepContext
from bench.gpu_plan import NUM, OPT_STR

SIZES_BLOCKS = (1, 2, 4, 8, 16, 32, 128)
_ROW = {"blocks": NUM, "bytes": NUM, "send_ms": NUM, "send_gb_per_s": NUM,
        "local_block_copy_gb_per_s": NUM, "device_copy_gb_per_s": NUM,
        "fraction_of_device_copy": NUM, "exact": bool}
SCHEMA: dict[str, Any] = {"layout": {"block_bytes": NUM, "num_blocks": NUM, "dtype": str},
                          "path": str, "same_gpu": bool, "placement": OPT_STR,
                          "setup_s": NUM, "sizes": [_ROW]}
FAKE: dict[str, Any] = {
    "layout": {"block_bytes": 2 << 20, "num_blocks": 300, "dtype": "bfloat16"},
    "path": "ipc", "same_gpu": True, "placement": "one bundle {'GPU': 1.0, 'CPU': 2.0}",
    "setup_s": 9.5,
    "sizes": [{"blocks": 128, "bytes": 256 << 20, "send_ms": 0.2, "send_gb_per_s": 1300.0,
               "local_block_copy_gb_per_s": 1500.0, "device_copy_gb_per_s": 2000.0,
               "fraction_of_device_copy": 0.65, "exact": True}],
}


def headline(r: dict[str, Any]) -> dict[str, Any]:
    big = max(r["sizes"], key=lambda s: s["bytes"]) if r["sizes"] else None
    return {"path": r["path"],
            "largest_mib": big["bytes"] / 2**20 if big else None,
            "largest_send_gb_per_s": big["send_gb_per_s"] if big else None,
            "largest_fraction_of_device_copy": big["fraction_of_device_copy"] if big else None,
            "all_exact": all(s["exact"] for s in r["sizes"])}


class Side:
    """One end: a KV cache of ``layout`` on this process's device. Used as a Ray actor
    on the GPU and as a plain object on CPU."""

    def __init__(self, num_blocks: int, block_size: int, toy: bool, seed: int) -> None:
        import torch

        from engine.kv_layout import KVLayout

        self.device = "cpu" if toy else "cuda"
        layers, heads, dim = (2, 2, 16) if toy else (32, 8, 128)  # toy vs llama-3-8b
        dtype = torch.float32 if toy else torch.bfloat16
        self.layout = KVLayout(num_blocks, layers, block_size, heads, dim, dtype)
        g = torch.Generator(device=self.device).manual_seed(seed)
        self.cache = torch.randn(self.layout.shape, generator=g, device=self.device,
                                 dtype=torch.float32).to(dtype)
        self.sender: Any = None

    def describe(self) -> dict[str, Any]:
        return _describe(self)

    def uuid(self) -> str:
        import torch

        return str(torch.cuda.get_device_properties(0).uuid) if self.device == "cuda" else "cpu"

    def endpoint(self) -> Any:
        from kvtransfer import make_receiver, spec_of

        self.receiver = make_receiver("cuda-ipc")
        return self.receiver.endpoint(self.cache, "bench-decode", spec_of(self.layout))

    def block_sums(self, ids: list[int]) -> list[float]:
        return self.cache[ids].double().flatten(1).sum(1).tolist()

    def send(self, endpoint: Any, src: list[int], dst: list[int], reps: int) -> dict[str, Any]:
        """Median host ms of ``CudaIpcSender.send`` (after one untimed call that opens
        the mapping), and the path it took."""
        from kvtransfer import make_sender

        if self.sender is None:
            self.sender = make_sender("cuda-ipc", "bench-prefill")
        times = []
        for i in range(reps + 1):
            t0 = time.perf_counter()
            self.sender.send(self.cache, src, endpoint, dst, f"bench-{len(src)}-{i}")
            times.append((time.perf_counter() - t0) * 1e3)
        return {"ms": statistics.median(times[1:]), "path": self.sender.last_path}

    def local(self, n: int, reps: int) -> dict[str, float]:
        """This process's own ceilings for blocks 1..n: the block-copy kernel into a
        scratch cache, and a plain device copy of as many contiguous bytes (the cache
        itself is left as it is: the transfers are checked against it)."""
        import torch

        from bench.gpu_common import median_ms
        from kvtransfer.block_copy import copy_blocks

        cuda = self.device == "cuda"
        scratch = torch.empty((n + 1, *self.layout.block_shape), dtype=self.layout.dtype,
                              device=self.device)
        src = torch.arange(1, n + 1, device=self.device)
        dst = torch.arange(n, 0, -1, device=self.device)
        a = median_ms(lambda: copy_blocks(self.cache, src, scratch, dst), reps, 2, cuda)
        flat, out = self.cache[1:n + 1].reshape(-1), scratch[1:].reshape(-1)
        b = median_ms(lambda: out.copy_(flat), reps, 2, cuda)
        return {"block_copy_ms": a, "device_copy_ms": b}


class LocalEnds:
    """Both ends in this process (the dry run: no Ray, no IPC); the copy between them is
    kvtransfer.block_copy's torch path."""

    placement: str | None = None
    same_gpu = True

    def __init__(self, num_blocks: int) -> None:
        from kvtransfer.pairing import transfer_path

        self.recv, self.send_side = Side(num_blocks, 4, True, 1), Side(num_blocks, 4, True, 2)
        self.path, _ = transfer_path(["gpu-a"], "gpu-a", False, "bench-decode")

    def describe(self) -> dict[str, Any]:
        return _describe(self.recv)

    def send(self, src: list[int], dst: list[int], reps: int) -> dict[str, Any]:
        import torch

        from bench.gpu_common import median_ms
        from kvtransfer.block_copy import copy_blocks

        s, d = torch.tensor(src), torch.tensor(dst)
        rc, sc = self.recv.cache, self.send_side.cache
        return {"ms": median_ms(lambda: copy_blocks(sc, s, rc, d), reps, 1, False),
                "path": self.path}

    def local(self, n: int, reps: int) -> dict[str, float]:
        return self.send_side.local(n, reps)

    def exact(self, src: list[int], dst: list[int]) -> bool:
        return self.recv.block_sums(dst) == self.send_side.block_sums(src)


class RayEnds:
    """Two actors of 0.5 GPU each in one bundle of the pairing helper's plan."""

    def __init__(self, num_blocks: int) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from runtime.config import pair_on_gpus

        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False,
                 log_to_driver=True)
        plan = pair_on_gpus(1, 1, 0.5)
        pg = placement_group(list(plan.bundles), strategy="PACK")
        ray.get(pg.ready(), timeout=60)
        actor = ray.remote(num_gpus=0.5, num_cpus=1)(Side)

        def make(role: str, seed: int) -> Any:
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=plan.bundle_of[(role, 0)])
            return actor.options(scheduling_strategy=strategy).remote(num_blocks, 16, False,
                                                                      seed)

        self.recv, self.send_side = make("decode", 1), make("prefill", 2)
        self.placement = f"one bundle {plan.bundles[0]}"
        self.same_gpu = _get(self.recv.uuid.remote()) == _get(self.send_side.uuid.remote())
        self.endpoint = _get(self.recv.endpoint.remote())

    def describe(self) -> dict[str, Any]:
        return _get(self.recv.describe.remote())

    def send(self, src: list[int], dst: list[int], reps: int) -> dict[str, Any]:
        return _get(self.send_side.send.remote(self.endpoint, src, dst, reps))

    def local(self, n: int, reps: int) -> dict[str, float]:
        return _get(self.send_side.local.remote(n, reps))

    def exact(self, src: list[int], dst: list[int]) -> bool:
        return _get(self.recv.block_sums.remote(dst)) == _get(
            self.send_side.block_sums.remote(src))


def _describe(side: Side) -> dict[str, Any]:
    return {"block_bytes": side.layout.bytes_per_block, "num_blocks": side.layout.num_blocks,
            "dtype": str(side.layout.dtype).removeprefix("torch.")}


def _get(ref: Any) -> Any:
    import ray

    return ray.get(ref, timeout=60)


def run(ctx: StepContext) -> None:
    sizes = (1, 2) if ctx.toy else SIZES_BLOCKS
    num_blocks = 2 * max(sizes) + 8
    reps = 3 if ctx.toy else 10
    try:
        _measure(ctx, sizes, num_blocks, reps)
    finally:  # also on the suite's SIGTERM at the budget: the local Ray goes with us
        if not ctx.toy:
            import ray

            ray.shutdown()


def _measure(ctx: StepContext, sizes: tuple[int, ...], num_blocks: int, reps: int) -> None:
    t0 = time.perf_counter()
    ends: LocalEnds | RayEnds = LocalEnds(num_blocks) if ctx.toy else RayEnds(num_blocks)
    ctx.record("layout", ends.describe())
    ctx.record("placement", ends.placement)
    ctx.record("same_gpu", ends.same_gpu)
    ctx.record("path", "unknown")
    ctx.record("setup_s", time.perf_counter() - t0)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        if not ctx.has_time(4):
            break
        src = list(range(1, n + 1))
        dst = list(range(num_blocks - n, num_blocks))[::-1]  # far away, in reverse order
        sent, local = ends.send(src, dst, reps), ends.local(n, reps)
        nbytes = n * ctx.result["layout"]["block_bytes"]
        rows.append({"blocks": n, "bytes": nbytes, "send_ms": sent["ms"],
                     "send_gb_per_s": nbytes / sent["ms"] / 1e6,
                     "local_block_copy_gb_per_s": nbytes / local["block_copy_ms"] / 1e6,
                     "device_copy_gb_per_s": nbytes / local["device_copy_ms"] / 1e6,
                     "fraction_of_device_copy": local["device_copy_ms"] / sent["ms"],
                     "exact": ends.exact(src, dst)})
        ctx.record("path", sent["path"])
        ctx.record("sizes", rows)
    ctx.check("transfers_exact", bool(rows) and all(r["exact"] for r in rows))
    ctx.check("ipc_path_on_one_gpu", ctx.toy or ctx.result["path"] == "ipc")
