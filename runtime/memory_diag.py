"""Opt-in memory diagnostics read inside a worker process (issue 11: prefill RSS growth).

RSS seen from outside cannot tell a leak (live objects kept) from the allocator keeping
freed memory, nor Python objects from C/C++ allocations (torch, Ray's core worker). So,
only when ``PDSERVE_MEMORY_DIAG`` names a directory, each worker starts a thread that
every ``PDSERVE_MEMORY_DIAG_S`` seconds (15) appends one JSON line to
``<dir>/<worker_id>.jsonl`` with:

- the process's RSS split (anonymous / shared / file) and thread count;
- glibc's ``mallinfo2`` (bytes in live allocations vs bytes held from the OS, heap vs
  mmap) and the number of malloc arenas (``malloc_info``);
- Python's allocations (tracemalloc): traced bytes and the source lines whose traced
  bytes grew most since the first record and since the previous one;
- live Python objects (gc) by type, the types that grew most since the first record.

``pdserve bench soak --memory-diag`` sets the variable and stores the latest record of
each worker with every sample. Off (the default) it costs nothing: no thread, no
tracing. On, tracemalloc slows Python code and every record walks the heap (~1 s):
a diagnostic, not something to leave on in service.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import json
import os
import re
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

ENV_DIR = "PDSERVE_MEMORY_DIAG"
ENV_INTERVAL = "PDSERVE_MEMORY_DIAG_S"
# Also collect cyclic garbage before each record and say what it was: tells objects kept
# alive from objects merely waiting for the oldest generation's (rare) collection. It
# changes what it measures (a full collection every record): an experiment, not a probe.
ENV_COLLECT = "PDSERVE_MEMORY_DIAG_COLLECT"
TOP = 12  # growth sites / types kept per record
MB = 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    return libc


def malloc_stats(libc: ctypes.CDLL) -> dict[str, float]:
    """glibc's view, in MiB: ``in_use`` = live allocations (heap + mmapped), ``held`` =
    what the allocator has from the OS; ``heap_free`` = held in heap arenas but free
    (fragmentation or not yet trimmed), the part RSS keeps after a free."""
    m = libc.mallinfo2()
    return {"malloc_in_use_mb": (m.uordblks + m.hblkhd) / MB,
            "malloc_held_mb": (m.arena + m.hblkhd) / MB,
            "malloc_heap_mb": m.arena / MB, "malloc_heap_free_mb": m.fordblks / MB,
            "malloc_mmapped_mb": m.hblkhd / MB, "malloc_mmaps": float(m.hblks)}


_HEAP = re.compile(r'<heap nr="(\d+)">.*?<total type="fast" count="\d+" size="(\d+)"/>'
                   r'.*?<total type="rest" count="\d+" size="(\d+)"/>'
                   r'.*?<system type="current" size="(\d+)"/>', re.S)


def malloc_arenas(libc: ctypes.CDLL) -> list[float]:
    """MiB in use in each arena glibc has made (``malloc_info``; in creation order: 0 is
    the main thread's, then one per thread that allocated, up to 8 x cores). Which arena
    grows hints at which thread allocates what is kept (the engine thread, the KV send's
    threads, Ray's C++ threads)."""
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        fp = libc.fopen(f.name.encode(), b"w")
        if not fp:
            return []
        libc.malloc_info(0, fp)
        libc.fclose(fp)
        xml = Path(f.name).read_text()
    return [round((int(cur) - int(fast) - int(rest)) / MB, 2)
            for _, fast, rest, cur in _HEAP.findall(xml)]


def ray_references() -> int | None:
    """Object refs this process's Ray core worker tracks (owned or borrowed): refs held
    by mistake grow it. A private Ray API: None when it is not there."""
    if "ray" not in sys.modules:
        return None
    try:
        import ray

        core = ray._private.worker.global_worker.core_worker
        return len(core.get_all_reference_counts())
    except Exception:
        return None


def proc_status() -> dict[str, float]:
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key.lower() + "_mb"] = int(value.split()[0]) / 1024
            elif key == "Threads":
                out["threads"] = float(value)
    return out


def short_path(path: str) -> str:
    """A source path as imported (``ray/actor.py``, ``engine/request.py``): records are
    kept with results, and the machine's own directories say nothing there."""
    roots = [r for r in sys.path if r and path.startswith(r.rstrip("/") + "/")]
    return path[len(max(roots, key=len).rstrip("/")) + 1:] if roots else path


def _sites(new: tracemalloc.Snapshot, old: tracemalloc.Snapshot) -> list[dict[str, Any]]:
    stats = new.compare_to(old, "lineno")
    stats.sort(key=lambda s: s.size_diff, reverse=True)
    return [{"site": f"{short_path(s.traceback[0].filename)}:{s.traceback[0].lineno}",
             "kb": round(s.size / 1024, 1),
             "kb_diff": round(s.size_diff / 1024, 1), "count_diff": s.count_diff}
            for s in stats[:TOP]]


def _name(o: object) -> str:
    """A type name; coroutines also by function and where they wait (or 'done')."""
    if inspect.iscoroutine(o):
        frame = o.cr_frame
        return f"coroutine {o.cr_code.co_qualname}:{frame.f_lineno if frame else 'done'}"
    return type(o).__name__


def object_counts(objects: list[Any] | None = None) -> Counter[str]:
    return Counter(_name(o) for o in (gc.get_objects() if objects is None else objects))


def collect_garbage() -> dict[str, Any]:
    """Run a full collection, keeping what it finds long enough to count it by type."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        found = gc.collect()
        kinds = object_counts(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
    gc.collect()  # now free them
    return {"gc_garbage_found": found, "gc_garbage_types": dict(kinds.most_common(TOP))}


class MemoryDiag:
    """The sampling thread of one worker process (a daemon: it dies with the worker)."""

    def __init__(self, path: Path, interval_s: float, collect: bool = False) -> None:
        self.path = path
        self.interval_s = interval_s
        self.collect = collect
        self._libc = _libc()
        tracemalloc.start(1)  # one frame: the allocating line, the cheapest tracing
        self._first: tracemalloc.Snapshot | None = None
        self._prev: tracemalloc.Snapshot | None = None
        self._first_objects: Counter[str] = Counter()
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="memory-diag", daemon=True)
        self._thread.start()

    def record(self) -> dict[str, Any]:
        garbage = collect_garbage() if self.collect else {}
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        objects = object_counts()
        if self._first is None:
            self._first, self._prev, self._first_objects = snap, snap, objects
        assert self._prev is not None
        grown = objects.copy()
        grown.subtract(self._first_objects)
        traced, peak = tracemalloc.get_traced_memory()
        rec = {"t_s": time.monotonic() - self._t0, "pid": os.getpid(), **proc_status(),
               **malloc_stats(self._libc), "malloc_arena_in_use_mb": malloc_arenas(self._libc),
               "ray_references": ray_references(),
               "traced_mb": traced / MB, "traced_peak_mb": peak / MB,
               "python_objects": sum(objects.values()),
               "gc_counts": list(gc.get_count()), **garbage,
               "gc_collections": [g["collections"] for g in gc.get_stats()],
               "sites_since_first": _sites(snap, self._first),
               "sites_since_prev": _sites(snap, self._prev),
               "types_since_first": dict(grown.most_common(TOP))}
        self._prev = snap
        return rec

    def _run(self) -> None:
        while not self._stop.wait(0 if self._first is None else self.interval_s):
            try:
                rec = self.record()
            except Exception as e:  # a diagnostic must never take the worker down
                rec = {"t_s": time.monotonic() - self._t0, "error": repr(e)}
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def stop(self) -> None:
        self._stop.set()


def start_from_env(worker_id: str) -> MemoryDiag | None:
    """A running MemoryDiag if ``PDSERVE_MEMORY_DIAG`` is set, else None (no cost)."""
    out_dir = os.environ.get(ENV_DIR)
    if not out_dir:
        return None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return MemoryDiag(Path(out_dir) / f"{worker_id}.jsonl",
                      float(os.environ.get(ENV_INTERVAL, "15")),
                      collect=os.environ.get(ENV_COLLECT) == "1")


def latest(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The last record of each worker's file under ``out_dir`` (for the soak)."""
    out = {}
    for p in sorted(out_dir.glob("*.jsonl")):
        lines = p.read_text().splitlines()
        if lines:
            out[p.stem] = json.loads(lines[-1])
    return out
