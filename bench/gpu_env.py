"""Step a: the environment, and the two ceilings every later figure is divided by.

- the GPU (name, memory, SMs, compute capability), driver and CUDA versions, the
  versions of torch / triton / cupy / ray / transformers, and whether cupy's CUDA
  runtime is torch's and cupy finds NCCL;
- every module the kit imports (bench/gpu_plan.py REQUIRED_IMPORTS), importable or not;
- the device-to-device copy bandwidth (2 GiB, bytes read + written; the roofline's
  denominator) and a bf16 8192^3 matmul rate on random data.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
from typing import Any

from bench.gpu_common import StepContext, copy_bandwidth, median_ms, versions
from bench.gpu_plan import NUM, OPT_NUM, OPT_STR, REQUIRED_IMPORTS

SCHEMA: dict[str, Any] = {
    "gpu": {"name": str, "memory_bytes": NUM, "free_bytes": NUM, "sm_count": NUM,
            "capability": str, "driver": OPT_STR, "compute_mode": OPT_STR},
    "versions": {"*": OPT_STR},
    "cupy": {"runtime_version": OPT_NUM, "torch_cuda": OPT_STR, "nccl_version": OPT_NUM,
             "error": OPT_STR},
    "imports": {"*": OPT_STR},  # module -> None when it imports, else the error
    "alloc_conf": OPT_STR,
    "copy": {"buffer_bytes": NUM, "median_ms": NUM, "gb_per_s": NUM},
    "matmul_bf16": {"n": NUM, "median_ms": NUM, "tflop_per_s": NUM},
}

FAKE: dict[str, Any] = {
    "gpu": {"name": "NVIDIA H200", "memory_bytes": 150e9, "free_bytes": 149e9,
            "sm_count": 132, "capability": "9.0", "driver": "580.159.04",
            "compute_mode": "Default"},
    "versions": {"torch": "2.11.0", "triton": "3.6.0", "cupy": "14.2.0", "ray": "2.60.0"},
    "cupy": {"runtime_version": 13000, "torch_cuda": "13.0", "nccl_version": 22803,
             "error": None},
    "imports": {"torch": None, "ray": None, "starlette": "No module named 'starlette'"},
    "alloc_conf": None,
    "copy": {"buffer_bytes": 2**31, "median_ms": 1.0, "gb_per_s": 4300.0},
    "matmul_bf16": {"n": 8192, "median_ms": 1.4, "tflop_per_s": 780.0},
}


def headline(r: dict[str, Any]) -> dict[str, Any]:
    return {"gpu": r["gpu"]["name"], "copy_gb_per_s": r["copy"]["gb_per_s"],
            "bf16_tflop_per_s": r["matmul_bf16"]["tflop_per_s"],
            "missing_imports": sum(v is not None for v in r["imports"].values())}


def _smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
        return out.splitlines()[0].strip() or None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _imports(toy: bool) -> dict[str, str | None]:
    """module -> None if it imports, else why not. The dry run only looks the modules up
    (importing Ray, transformers and the rest costs seconds the CPU test has not got)."""
    found: dict[str, str | None] = {}
    for module, _dist in REQUIRED_IMPORTS:
        try:
            if toy:
                found[module] = None if importlib.util.find_spec(module) else "not found"
                continue
            importlib.import_module(module)
            found[module] = None
        except Exception as e:  # a broken install is as much a finding as a missing one
            found[module] = f"{type(e).__name__}: {e}"[:300]
    return found


def _cupy(torch_cuda: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"runtime_version": None, "torch_cuda": torch_cuda,
                           "nccl_version": None, "error": None}
    try:
        import cupy

        out["runtime_version"] = cupy.cuda.runtime.runtimeGetVersion()
        from cupy.cuda import nccl

        out["nccl_version"] = nccl.get_version()
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def run(ctx: StepContext) -> None:
    import torch

    cuda = ctx.device == "cuda"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        gpu = {"name": props.name, "memory_bytes": total, "free_bytes": free,
               "sm_count": props.multi_processor_count,
               "capability": f"{props.major}.{props.minor}",
               "driver": _smi("driver_version"), "compute_mode": _smi("compute_mode")}
    else:
        gpu = {"name": "cpu", "memory_bytes": 0, "free_bytes": 0,
               "sm_count": os.cpu_count() or 0, "capability": "none", "driver": None,
               "compute_mode": None}
    ctx.record("gpu", gpu)
    v = versions()
    ctx.record("versions", v)
    ctx.record("cupy", _cupy(v.get("torch_cuda")))
    ctx.record("imports", _imports(ctx.toy))
    # expandable segments would make the KV cache unexportable through CUDA IPC.
    ctx.record("alloc_conf", os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    ctx.record("copy", copy_bandwidth((16 << 20) if ctx.toy else (2 << 30),
                                      5 if ctx.toy else 50, ctx.device))
    n = 256 if ctx.toy else 8192
    dtype = torch.float32 if ctx.toy else torch.bfloat16
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    ms = median_ms(lambda: a @ b, 3 if ctx.toy else 20, 1 if ctx.toy else 3, cuda)
    ctx.record("matmul_bf16", {"n": n, "median_ms": ms, "tflop_per_s": 2 * n**3 / ms / 1e9})
    ctx.check("cuda_visible", cuda or ctx.toy)
    ctx.check("cupy_matches_torch_cuda", _same_major(ctx.result["cupy"], v.get("torch_cuda"))
              or ctx.toy)


def _same_major(cp: dict[str, Any], torch_cuda: str | None) -> bool:
    rt, tc = cp.get("runtime_version"), torch_cuda
    return bool(rt and tc) and int(rt) // 1000 == int(str(tc).split(".")[0])
