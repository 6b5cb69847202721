"""Benchmark the Triton attention kernels on a CUDA GPU; writes bench/results/kernels-<gpu>.json.

Decode: paged decode attention at the default shape (batch 64, context 4096, bf16,
32 query / 8 KV heads, head_dim 128, block size 16, blocks scattered over the pool),
reported as achieved bandwidth (bytes of KV read + Q read + O written, over the median
time of many runs timed with CUDA events), next to

- the device-to-device copy bandwidth of the same GPU, measured in the same run
  (torch copy of a large buffer; bytes read + bytes written), the practical ceiling;
- the torch path (gather the blocks + SDPA with a mask), what the CPU engine runs.

Prefill: the paged varlen prefill kernel against torch SDPA (causal, GQA) on the same
data laid out contiguously, in TFLOP/s of causal attention.

Every timed kernel is also checked against the reference on the same data (max abs
error is recorded). Usage (from the repository root, on a GPU machine):

    python bench/kernels.py                  # defaults above
    python bench/kernels.py --sweep          # also time other decode tiles and splits
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this file's folder comes first on sys.path and its own name
# (kernels.py) would shadow the kernels package: put the repository root first instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]
sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Triton paged-attention benchmark (CUDA only).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch", type=int, default=64, help="decode sequences")
    p.add_argument("--context", type=int, default=4096, help="KV tokens per decode sequence")
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-layers", type=int, default=2,
                   help="layers in the cross-layer cache (the benchmark reads one layer's "
                        "strided view, as the engine does)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--prefill-seqs", type=int, default=4)
    p.add_argument("--prefill-len", type=int, default=2048, help="tokens per prefill prompt")
    p.add_argument("--iters", type=int, default=100, help="timed runs per measurement")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--copy-mib", type=int, default=2048, help="buffer size of the copy baseline")
    p.add_argument("--sweep", action="store_true", help="also time other decode tiles/splits")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default bench/results/kernels-<gpu-name>.json)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check this script on CPU under TRITON_INTERPRET=1 with tiny shapes; "
                        "its numbers mean nothing and it writes no default result file")
    return p.parse_args(argv)


def _time_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Median milliseconds of fn over iters runs, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # --cpu-smoke: wall time, meaningless but runs
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
             for _ in range(iters)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def _copy_bandwidth(mib: int, iters: int, warmup: int, dev: torch.device) -> dict[str, float]:
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=dev)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), iters, warmup)
    moved = 2 * src.numel()  # every byte is read once and written once
    return {"buffer_bytes": src.numel(), "median_ms": ms, "gb_per_s": moved / ms / 1e6}


def _paged_decode_inputs(
    a: argparse.Namespace, dtype: torch.dtype, dev: torch.device
) -> dict[str, object]:
    from kernels.metadata import AttentionMetadata

    gen = torch.Generator(device=dev).manual_seed(0)
    per_seq = -(-a.context // a.block_size)
    nb = 1 + a.batch * per_seq
    full = torch.randn((nb, a.num_layers, 2, a.block_size, a.kv_heads, a.head_dim),
                       generator=gen, device=dev, dtype=dtype)
    # Scattered blocks, as a long-running pool hands them out; block 0 is the null block.
    order = (torch.randperm(nb - 1, device="cpu") + 1).tolist()
    tables = [order[i * per_seq : (i + 1) * per_seq] for i in range(a.batch)]
    seq_lens = [a.context] * a.batch
    meta = AttentionMetadata.build([1] * a.batch, seq_lens, tables, a.block_size, dev)
    meta.cpu_plan = None  # on CPU (--cpu-smoke) too: the Triton kernels take no plan
    q = torch.randn((a.batch, a.q_heads, a.head_dim), generator=gen, device=dev, dtype=dtype)
    return {"full": full, "cache": full[:, 0], "meta": meta, "q": q, "tables": tables,
            "seq_lens": seq_lens}


def _torch_plan_meta(meta: object, query_lens: list[int], seq_lens: list[int],
                     tables: list[list[int]], block_size: int, dev: torch.device) -> object:
    """The metadata with its CpuPlan built once and moved to the GPU, so the torch path is
    timed as gather + SDPA, not as per-call planning with host syncs."""
    import copy

    from kernels.metadata import _plan_cpu

    starts = [0]
    for ql in query_lens:
        starts.append(starts[-1] + ql)
    plan = _plan_cpu(starts, query_lens, seq_lens, tables, block_size)
    plan.decode_rows = plan.decode_rows.to(dev)
    plan.decode_block_tables = plan.decode_block_tables.to(dev)
    plan.decode_mask = plan.decode_mask.to(dev)
    plan.prefills = [(s, ql, ids.to(dev), sl, None if c is None else c.to(dev))
                     for s, ql, ids, sl, c in plan.prefills]
    out = copy.copy(meta)
    out.cpu_plan = plan  # type: ignore[attr-defined]
    return out


def bench_decode(
    a: argparse.Namespace, dtype: torch.dtype, copy_gbs: float, dev: torch.device
) -> dict[str, object]:
    from kernels.ref_attention import paged_attention_torch
    from kernels.triton_attention import (
        TileConfig,
        choose_num_splits,
        decode_attention,
        paged_attention_triton,
    )

    x = _paged_decode_inputs(a, dtype, dev)
    q, cache, meta = x["q"], x["cache"], x["meta"]
    scale = a.head_dim**-0.5
    out = torch.empty_like(q)
    elem = q.element_size()
    kv_bytes = sum(x["seq_lens"]) * a.kv_heads * a.head_dim * 2 * elem  # K and V, once each
    moved = kv_bytes + 2 * q.numel() * elem  # + Q read + O written

    tri_ms = _time_ms(lambda: paged_attention_triton(q, cache, meta, scale, out=out),
                      a.iters, a.warmup)
    tmeta = _torch_plan_meta(meta, [1] * a.batch, x["seq_lens"], x["tables"], a.block_size,
                             dev)
    ref = paged_attention_torch(q, cache, tmeta, scale)
    err = (out.float() - ref.float()).abs().max().item()
    torch_ms = _time_ms(lambda: paged_attention_torch(q, cache, tmeta, scale), a.iters, a.warmup)
    splits = choose_num_splits(a.batch, a.kv_heads, a.context, q.device)
    result: dict[str, object] = {
        "shape": {"batch": a.batch, "context": a.context, "q_heads": a.q_heads,
                  "kv_heads": a.kv_heads, "head_dim": a.head_dim, "block_size": a.block_size,
                  "dtype": a.dtype},
        "bytes_moved": moved,
        "num_splits": splits,
        "triton": {"median_ms": tri_ms, "gb_per_s": moved / tri_ms / 1e6,
                   "fraction_of_copy_bw": moved / tri_ms / 1e6 / copy_gbs},
        "torch_gather_sdpa": {"median_ms": torch_ms, "gb_per_s": moved / torch_ms / 1e6},
        "speedup_vs_torch": torch_ms / tri_ms,
        "max_abs_err_vs_torch": err,
    }
    if a.sweep:
        rows = []
        for cfg in (TileConfig(16, 16, 4), TileConfig(16, 32, 4), TileConfig(16, 32, 8),
                    TileConfig(16, 64, 4), TileConfig(16, 64, 8)):
            for n in sorted({1, 2, 4, splits}):
                ms = _time_ms(lambda c=cfg, n=n: decode_attention(q, cache, meta, scale, out, n,
                                                                  c), a.iters, a.warmup)
                rows.append({"block_n": cfg.block_n, "num_warps": cfg.num_warps, "splits": n,
                             "median_ms": ms, "gb_per_s": moved / ms / 1e6})
        result["sweep"] = rows
    return result


def bench_prefill(
    a: argparse.Namespace, dtype: torch.dtype, dev: torch.device
) -> dict[str, object]:
    from kernels.metadata import AttentionMetadata
    from kernels.triton_attention import paged_attention_triton

    n, length, bs = a.prefill_seqs, a.prefill_len, a.block_size
    gen = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn((n, a.q_heads, length, a.head_dim), generator=gen, device=dev,
                    dtype=dtype)  # (B, Hq, L, D): SDPA's contiguous layout
    k = torch.randn((n, a.kv_heads, length, a.head_dim), generator=gen, device=dev,
                    dtype=dtype)
    v = torch.randn_like(k)
    scale = a.head_dim**-0.5
    sdpa_ms = _time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                              scale=scale, enable_gqa=True),
                       a.iters, a.warmup)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    # The same K/V in paged blocks (one layer of a cross-layer cache), scattered.
    per_seq = -(-length // bs)
    nb = 1 + n * per_seq
    full = torch.zeros((nb, a.num_layers, 2, bs, a.kv_heads, a.head_dim), device=dev,
                       dtype=dtype)
    order = (torch.randperm(nb - 1) + 1).tolist()
    tables = [order[i * per_seq : (i + 1) * per_seq] for i in range(n)]
    cache = full[:, 0]
    for i, table in enumerate(tables):
        pad = per_seq * bs - length
        for j, kv in enumerate((k, v)):
            tokens = F.pad(kv[i].transpose(0, 1), (0, 0, 0, 0, 0, pad))  # (per_seq*bs, Hkv, D)
            blocks = tokens.view(per_seq, bs, a.kv_heads, a.head_dim)
            cache[torch.tensor(table, device=dev), j] = blocks
    meta = AttentionMetadata.build([length] * n, [length] * n, tables, bs, dev)
    q_rows = q.transpose(1, 2).reshape(n * length, a.q_heads, a.head_dim)  # (T, Hq, D)
    out = torch.empty_like(q_rows)
    tri_ms = _time_ms(lambda: paged_attention_triton(q_rows, cache, meta, scale, out=out),
                      a.iters, a.warmup)
    err = (out.view(n, length, a.q_heads, a.head_dim).transpose(1, 2).float()
           - ref.float()).abs().max().item()
    # Causal attention: QK^T and PV over half the (L x L) score matrix, 2 flops per MAC.
    flops = 4 * n * a.q_heads * a.head_dim * length * length / 2
    return {
        "shape": {"seqs": n, "len": length, "q_heads": a.q_heads, "kv_heads": a.kv_heads,
                  "head_dim": a.head_dim, "block_size": bs, "dtype": a.dtype},
        "triton_paged": {"median_ms": tri_ms, "tflop_per_s": flops / tri_ms / 1e9},
        "torch_sdpa_contiguous": {"median_ms": sdpa_ms, "tflop_per_s": flops / sdpa_ms / 1e9},
        "triton_over_sdpa_time": tri_ms / sdpa_ms,
        "max_abs_err_vs_sdpa": err,
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = _parse(argv)
    if a.cpu_smoke:
        if a.out is None or os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--cpu-smoke needs TRITON_INTERPRET=1 and an explicit --out")
    elif not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "on CPU run the kernel tests instead: pytest tests/kernels")
    import triton

    dtype = _DTYPES[a.dtype]
    dev = torch.device("cpu" if a.cpu_smoke else "cuda")
    gpu = "cpu-interpreter" if a.cpu_smoke else torch.cuda.get_device_name()
    copy = _copy_bandwidth(a.copy_mib, a.iters, a.warmup, dev)
    result = {
        "command": shlex.join(["python", "bench/kernels.py", *argv]),
        "gpu": gpu,
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "cuda": torch.version.cuda, "python": platform.python_version()},
        "device_copy": copy,
        "decode": bench_decode(a, dtype, copy["gb_per_s"], dev),
        "prefill": bench_prefill(a, dtype, dev),
    }
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    path = a.out or _ROOT / "bench" / "results" / f"kernels-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    dec, pre = result["decode"], result["prefill"]
    print(f"copy {copy['gb_per_s']:.0f} GB/s | decode triton {dec['triton']['gb_per_s']:.0f} GB/s "
          f"({dec['triton']['fraction_of_copy_bw']:.0%} of copy), torch "
          f"{dec['torch_gather_sdpa']['gb_per_s']:.0f} GB/s | prefill triton "
          f"{pre['triton_paged']['tflop_per_s']:.0f} TFLOP/s, sdpa "
          f"{pre['torch_sdpa_contiguous']['tflop_per_s']:.0f} TFLOP/s -> {path}")


if __name__ == "__main__":
    main()
