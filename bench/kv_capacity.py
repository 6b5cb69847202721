"""KV capacity and transfer bytes, int8 vs the model-dtype (fp32) cache on CPU, and the
native decode attention kernel's time on each.

- blocks per GiB and tokens per GiB of the embedded model's cache (engine.kv_layout,
  scales included);
- KV bytes per transferred request: what the ray backend ships for a prompt of N
  tokens (its gather of the request's blocks, measured on a real cache tensor);
- decode attention: the native CPU kernel over a 30-layer cross-layer cache (one layer's
  strided view, blocks shuffled), batch x context as given, fp32 vs int8 cache,
  interleaved runs, medians. ``--baseline-source old.c`` also times an older
  cpu_native.c on the fp32 cache (e.g. ``git show <commit>:kernels/cpu_native.c``), to
  check the fp32 path did not get slower.

    python bench/kv_capacity.py [--batch 16] [--context 1024] [--runs 9]
        [--baseline-source /tmp/old_cpu_native.c] [--out bench/results/kv-capacity-cpu.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.kv_layout import KVLayout
from engine.weights import load_model_config, resolve_model
from kernels import AttentionMetadata, cpu_native, gather_blocks
from kernels.kv_quant import quantize

GIB = 1 << 30
PROMPTS = (128, 512, 2048)


def capacity(model: str, block_size: int) -> dict:
    mc = load_model_config(resolve_model(model))
    out: dict = {"model": model, "block_size": block_size, "layers": mc.num_hidden_layers,
                 "kv_heads": mc.num_key_value_heads, "head_dim": mc.head_dim}
    for name, kv in (("fp32", None), ("int8", torch.int8)):
        layout = KVLayout(1 + max(PROMPTS) // block_size, mc.num_hidden_layers, block_size,
                          mc.num_key_value_heads, mc.head_dim, torch.float32, kv)
        cache = layout.allocate("cpu")
        per_request = {}
        for n in PROMPTS:
            ids = torch.arange(1, 1 + -(-n // block_size))
            staging = gather_blocks(cache, ids)  # what RaySender puts in the object store
            per_request[str(n)] = staging.numel() * staging.element_size()
        out[name] = {"bytes_per_block": layout.bytes_per_block,
                     "blocks_per_gib": GIB // layout.bytes_per_block,
                     "tokens_per_gib": GIB // layout.bytes_per_block * block_size,
                     "transfer_bytes_per_request": per_request}
    out["int8_vs_fp32_blocks_per_gib"] = out["int8"]["blocks_per_gib"] / out["fp32"][
        "blocks_per_gib"]
    return out


def _load_baseline(source: Path) -> ctypes.CDLL:
    so = Path(tempfile.mkdtemp()) / "baseline.so"
    subprocess.run([os.environ.get("CC", "cc"), *cpu_native.CFLAGS, str(source), "-o", str(so),
                    "-lm"], check=True)
    lib = ctypes.CDLL(str(so))
    lib.paged_attention_f32.argtypes = cpu_native._SIGNATURES["paged_attention_f32"]
    lib.paged_attention_f32.restype = ctypes.c_int
    return lib


def decode_timing(batch: int, context: int, runs: int, baseline: Path | None) -> dict:
    torch.manual_seed(0)
    hq, hkv, d, bs, layers = 9, 3, 64, 16, 30  # SmolLM2-135M's attention
    nb = batch * context // bs + 1
    full = torch.randn(nb, layers, 2, bs, hkv, d)
    full_q = quantize(full, torch.int8)
    tables = (torch.randperm(nb - 1) + 1).view(batch, -1).tolist()
    meta = AttentionMetadata.build([1] * batch, [context] * batch, tables, bs,
                                   torch.device("cpu"))
    q = torch.randn(batch, hq, d)
    out = torch.empty_like(q)
    lib = cpu_native._library()
    assert lib is not None, "the native kernels did not build"

    def call(fn: Callable[..., int], cache: torch.Tensor) -> None:
        rc = fn(q.data_ptr(), q.stride(0), q.stride(1), cache.data_ptr(), *cache.stride()[:4],
                out.data_ptr(), out.stride(0), out.stride(1), meta.query_start_loc.data_ptr(),
                meta.seq_lens.data_ptr(), meta.block_tables.data_ptr(),
                meta.block_tables.stride(0), batch, hkv, hq // hkv, d, bs, d**-0.5)
        assert rc == 0

    layer = layers // 2
    cases = {"fp32": (lib.paged_attention_f32, full[:, layer]),
             "int8": (lib.paged_attention_i8, full_q[:, layer])}
    if baseline is not None:
        cases["fp32_baseline"] = (_load_baseline(baseline).paged_attention_f32, full[:, layer])
    ms: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(runs):  # interleaved, so contention hits every case alike
        for name, (fn, cache) in cases.items():
            call(fn, cache)
            t0 = time.perf_counter()
            for _ in range(10):
                call(fn, cache)
            ms[name].append((time.perf_counter() - t0) / 10 * 1e3)
    med = {k: statistics.median(v) for k, v in ms.items()}
    res = {"batch": batch, "context": context, "threads": torch.get_num_threads(),
           "median_ms": med, "runs_ms": ms, "int8_vs_fp32_time": med["int8"] / med["fp32"]}
    if baseline is not None:
        res["fp32_vs_baseline_time"] = med["fp32"] / med["fp32_baseline"]
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--runs", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--baseline-source", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res = {"capacity": capacity(a.model, a.block_size),
           "decode_attention": decode_timing(a.batch, a.context, a.runs, a.baseline_source),
           "command": "python bench/kv_capacity.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "torch": torch.__version__}}
    print(json.dumps(res, indent=2))
    if a.out:
        a.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
