"""The native CPU attention kernel (cpu_attention.c): built at first use, called via ctypes.

Plain C with OpenMP and no torch headers, compiled by the machine's C compiler into the
user's cache directory (``$XDG_CACHE_HOME/pdserve/kernels``, else ``~/.cache/...``),
under a name that hashes the source, the flags, the compiler and the CPU: a fresh
machine builds it once (about a second), later processes just load it. ``-march=native``
is safe because the CPU is part of the name.

Why not torch.utils.cpp_extension: a torch extension compiles the ATen headers (tens
of seconds on a 2-core machine) and needs ninja; the kernel only needs pointers and
strides. The library links libgomp by its soname, so it joins the OpenMP runtime torch
has already loaded (one thread pool, not two).

Anything going wrong (no compiler, a failed build, ``PDSERVE_NATIVE_KERNELS=0``) logs
one line and makes ``available()`` false; callers then use the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from kernels.metadata import AttentionMetadata

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_attention.c")
# -fno-trapping-math (as torch builds): lets the exp and select loops vectorise; it only
# drops FP-exception side effects. -ffp-contract=fast: multiply-adds become FMAs (one
# rounding instead of two), which ISO C mode would otherwise forbid.
CFLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast",
          "-fopenmp", "-fPIC", "-shared", "-std=c11"]
MAX_GROUP = 64  # Hq / Hkv; the kernel's per-item row arrays are sized for this

# (name, ctypes type) of paged_attention_f32's parameters, in order.
_I64, _P = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [
    _P, _I64, _I64,  # q, row and head strides
    _P, _I64, _I64, _I64, _I64,  # cache, block / kv / token / head strides
    _P, _I64, _I64,  # out, row and head strides
    _P, _P, _P, _I64,  # query_start_loc, seq_lens, block_tables, its row stride
    _P, _I64,  # seqs to compute, how many
    _I64, _I64, _I64, _I64, ctypes.c_float,  # Hkv, group, D, block_size, scale
    ctypes.c_int,  # threads
]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "pdserve" / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags"))][:2]
    return platform.machine() + "\n" + "\n".join(keep)


def build(verbose: bool = False) -> Path:
    """Compile the kernel if this exact build is not cached yet; returns the library path."""
    cc = os.environ.get("CC", "cc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True)
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join(
        [src, " ".join(CFLAGS).encode(), version.stdout.encode(), _cpu_id().encode()]
    )).hexdigest()[:16]
    out = _cache_dir() / f"pdserve_cpu_attention_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first uses never see half a file.
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    t0 = time.perf_counter()
    try:
        res = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", tmp, "-lm"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if verbose:
        log.info("built %s in %.2fs", out, time.perf_counter() - t0)
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("PDSERVE_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        fn = lib.paged_attention_f32
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("native CPU attention unavailable, using the torch path: %s",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    fn.argtypes = _ARGTYPES
    fn.restype = ctypes.c_int
    return lib


def available() -> bool:
    """Whether the native kernel is built and loaded (builds it on the first call)."""
    return _library() is not None


def supports(q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
    """Whether these tensors can go to the native kernel (else: the torch path)."""
    return (
        q.dtype == torch.float32
        and kv_cache.dtype == torch.float32
        and q.device.type == "cpu"
        and kv_cache.device.type == "cpu"
        and q.stride(2) == 1
        and kv_cache.stride(4) == 1
        and q.shape[1] // kv_cache.shape[3] <= MAX_GROUP
        and available()
    )


def paged_attention_native(
    q: torch.Tensor,  # (T, Hq, D) fp32, head_dim contiguous
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, Hkv, D), any strides but D's
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # (T, Hq, D), head_dim contiguous; only the listed rows are written
    seqs: torch.Tensor,  # (n,) int32, the sequences whose query rows to compute
) -> None:
    lib = _library()
    assert lib is not None, "call supports() first"
    if out.stride(2) != 1:
        raise ValueError(f"out must have a contiguous head_dim, strides {out.stride()}")
    for name, t in (("query_start_loc", meta.query_start_loc), ("seq_lens", meta.seq_lens),
                    ("block_tables", meta.block_tables), ("seqs", seqs)):
        if t.dtype != torch.int32 or t.device.type != "cpu" or t.stride(-1) != 1:
            raise ValueError(f"{name} must be int32 on the CPU with a unit last stride")
    hkv, d = kv_cache.shape[3], kv_cache.shape[4]
    rc = lib.paged_attention_f32(
        q.data_ptr(), q.stride(0), q.stride(1),
        kv_cache.data_ptr(), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3),
        out.data_ptr(), out.stride(0), out.stride(1),
        meta.query_start_loc.data_ptr(), meta.seq_lens.data_ptr(),
        meta.block_tables.data_ptr(), meta.block_tables.stride(0),
        seqs.data_ptr(), seqs.numel(),
        hkv, q.shape[1] // hkv, d, kv_cache.shape[2], scale,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise RuntimeError(f"paged_attention_f32 failed with code {rc}")
