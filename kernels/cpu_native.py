"""Native CPU kernels (cpu_native.c): built at first use, called through ctypes.

Two fp32 kernels for the engine's CPU path: paged attention reading the KV blocks in
place (decode rows and prefill chunks of a step in one call), and rotary embedding
fused with the KV-cache store. The torch path (ref_*.py) stays the reference and the
fallback.

Plain C with OpenMP and no torch headers, compiled by the machine's C compiler into the
user's cache directory (``$XDG_CACHE_HOME/pdserve/kernels``, else ``~/.cache/...``),
under a name that hashes the source, the flags, the compiler and the CPU: a fresh
machine builds it once (1-2 s), later processes just load it. ``-march=native``
is safe because the CPU is part of the name.

Why not torch.utils.cpp_extension: a torch extension compiles the ATen headers (tens
of seconds on a 2-core machine) and needs ninja; these kernels only need pointers and
strides. The library links libgomp by its soname, so it joins the OpenMP runtime torch
has already loaded (one thread pool, not two) and uses torch's thread count.

Anything going wrong (no compiler, a failed build, ``PDSERVE_NATIVE_KERNELS=0``) logs
one line and makes ``available()`` false; callers then use the torch path.

An int8 cache (kernels/kv_quant.py rows: int8 values, then their fp32 scale) goes to the
``*_i8`` entry points, chosen by the cache's dtype: attention dequantizes 16-key tiles
in its loops, rotary + store quantizes on write.
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

SOURCE = Path(__file__).with_name("cpu_native.c")
# -fno-trapping-math (as torch builds): lets the exp and select loops vectorise; it only
# drops FP-exception side effects. -ffp-contract=fast: multiply-adds become FMAs (one
# rounding instead of two) in attention, which ISO C mode would otherwise forbid;
# rotary opts out (it must equal the torch path bit for bit).
CFLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=fast",
          "-fopenmp", "-fPIC", "-shared", "-std=c11"]
MAX_GROUP = 64  # Hq / Hkv; the attention kernel's per-item row arrays are sized for this
MAX_HEAD_DIM = 256  # and head_dim must be a multiple of 16 (one vector)

_I64, _P = ctypes.c_int64, ctypes.c_void_p
_ATTENTION = [
        _P, _I64, _I64,  # q, row and head strides
        _P, _I64, _I64, _I64, _I64,  # cache, block / kv / token / head strides
        _P, _I64, _I64,  # out, row and head strides
        _P, _P, _P, _I64, _I64,  # query_start_loc, seq_lens, block_tables, its row stride, B
        _I64, _I64, _I64, _I64, ctypes.c_float,  # Hkv, group, D, block_size, scale
]
_ROTARY_STORE = [
        _P, _I64, _I64,  # q, row and head strides
        _P, _I64, _I64,  # k
        _P, _I64, _I64,  # v
        _P, _P, _I64, _I64,  # positions, cos_sin, its row stride, its rows
        _P, _I64, _I64, _I64, _I64,  # cache, block / kv / token / head strides
        _P, _I64, _I64,  # slot_mapping, number of slots, block_size
        _I64, _I64, _I64, _I64,  # T, Hq, Hkv, D
]
_SIGNATURES = {  # C parameter types, in order; *_i8: the same over an int8 cache
    "paged_attention_f32": _ATTENTION,
    "paged_attention_i8": _ATTENTION,
    "rotary_store_f32": _ROTARY_STORE,
    "rotary_store_i8": _ROTARY_STORE,
}


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


def build() -> Path:
    """Compile the kernels if this exact build is not cached yet; returns the library path."""
    cc = os.environ.get("CC", "cc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True)
    key = hashlib.sha256(b"\0".join(
        [SOURCE.read_bytes(), " ".join(CFLAGS).encode(), version.stdout.encode(),
         _cpu_id().encode()]
    )).hexdigest()[:16]
    out = _cache_dir() / f"pdserve_cpu_native_{key}.so"
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
    log.info("built the native CPU kernels in %.2fs: %s", time.perf_counter() - t0, out)
    return out


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("PDSERVE_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = ctypes.c_int
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        log.warning("native CPU kernels unavailable, using the torch path: %s",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    return lib


def available() -> bool:
    """Whether the native kernels are built and loaded (builds them on the first call)."""
    return _library() is not None


# The checks below run twice per layer per step, so they are written for speed: no
# generator expressions, the metadata's verdict computed once per step.
def _cpu_f32(t: torch.Tensor) -> bool:
    """An fp32 CPU tensor whose last dimension is contiguous."""
    return t.dtype is torch.float32 and t.is_cpu and t.stride(-1) == 1


def _cpu_i64(t: torch.Tensor) -> bool:
    return t.dtype is torch.int64 and t.is_cpu and t.stride(-1) == 1


def _cpu_cache(t: torch.Tensor) -> bool:
    """An fp32 cache, or an int8 one of kernels.kv_quant's rows, on CPU, rows contiguous."""
    return (t.dtype is torch.float32 or t.dtype is torch.int8) and t.is_cpu and t.stride(-1) == 1


def supports(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> bool:
    """Whether this attention call can go to the native kernel (else: the torch path)."""
    d = q.shape[2]
    return (
        _cpu_f32(q)
        and _cpu_cache(kv_cache)
        and d % 16 == 0
        and d <= MAX_HEAD_DIM
        and q.shape[1] // kv_cache.shape[3] <= MAX_GROUP
        and meta.host_int32
        and available()
    )


def paged_attention_native(
    q: torch.Tensor,  # (T, Hq, D) fp32, head_dim contiguous
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, Hkv, D), any strides but D's
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,  # (T, Hq, D), head_dim contiguous
) -> None:
    """Writes every query row of ``out``; the caller has checked ``supports()``."""
    lib = _library()
    if lib is None or not _cpu_f32(out):
        raise ValueError("native attention needs the built kernels and an fp32 CPU out with "
                         "a contiguous head_dim; check supports() first")
    hkv, d = kv_cache.shape[3], q.shape[2]
    fn = lib.paged_attention_i8 if kv_cache.dtype is torch.int8 else lib.paged_attention_f32
    rc = fn(
        q.data_ptr(), q.stride(0), q.stride(1),
        kv_cache.data_ptr(), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3),
        out.data_ptr(), out.stride(0), out.stride(1),
        meta.query_start_loc.data_ptr(), meta.seq_lens.data_ptr(),
        meta.block_tables.data_ptr(), meta.block_tables.stride(0), meta.num_seqs,
        hkv, q.shape[1] // hkv, d, kv_cache.shape[2], scale,
    )
    if rc != 0:
        raise RuntimeError(f"native paged attention failed with code {rc}")


def supports_rotary_store(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
    cos_sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> bool:
    """Whether rotary_store_native can take these tensors (else: the torch ops)."""
    return (
        _cpu_f32(q) and _cpu_f32(k) and _cpu_f32(v) and _cpu_f32(cos_sin)
        and _cpu_cache(kv_cache) and _cpu_i64(positions) and _cpu_i64(slot_mapping)
        and available()
    )


def rotary_store_native(
    q: torch.Tensor,  # (T, Hq, D), rotated in place
    k: torch.Tensor,  # (T, Hkv, D), rotated in place
    v: torch.Tensor,  # (T, Hkv, D)
    positions: torch.Tensor,  # (T,) int64
    cos_sin: torch.Tensor,  # (max_pos, D) fp32 [cos | sin]
    kv_cache: torch.Tensor,  # (num_blocks, 2, block_size, Hkv, D)
    slot_mapping: torch.Tensor,  # (T,) int64, -1 = don't store
) -> None:
    """Rotate q and k in place, then store k and v at their slots; the caller has checked
    ``supports_rotary_store()``. Raises IndexError for a position or slot out of range
    (before writing anything)."""
    lib = _library()
    assert lib is not None
    nb, _, bs, hkv, _ = kv_cache.shape
    d = q.shape[2]
    fn = lib.rotary_store_i8 if kv_cache.dtype is torch.int8 else lib.rotary_store_f32
    rc = fn(
        q.data_ptr(), q.stride(0), q.stride(1),
        k.data_ptr(), k.stride(0), k.stride(1),
        v.data_ptr(), v.stride(0), v.stride(1),
        positions.data_ptr(), cos_sin.data_ptr(), cos_sin.stride(0), cos_sin.shape[0],
        kv_cache.data_ptr(), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        kv_cache.stride(3),
        slot_mapping.data_ptr(), nb * bs, bs,
        q.shape[0], q.shape[1], hkv, d,
    )
    if rc != 0:
        raise IndexError("rotary_store: a position is past the rotary table or a slot past "
                         "the cache")
