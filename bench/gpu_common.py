"""What the GPU kit's steps share: their context (where to write, how long they have,
toy or real) and the two timing primitives (CUDA-event medians, copy bandwidth).

A step writes its JSON as it goes (``ctx.record``), atomically, so a step the suite has
to kill at its budget still leaves what it measured up to then.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (file and folder names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def write_json(path: Path, doc: Any) -> None:
    """Write atomically: a reader (or a kill) never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)


@dataclass
class StepContext:
    """One step's run. ``toy``: the CPU-equivalent at toy size (the dry run)."""

    key: str
    name: str
    out: Path  # this step's JSON
    budget_s: float
    toy: bool
    device: str  # "cuda" or "cpu"
    started: float = field(default_factory=time.monotonic)
    result: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    status: str = "running"
    error: str | None = None

    def left_s(self) -> float:
        """Seconds left before the suite kills this step (with a margin to write)."""
        return self.budget_s - (time.monotonic() - self.started) - 3.0

    def has_time(self, need_s: float) -> bool:
        ok = self.left_s() >= need_s
        if not ok:
            self.result.setdefault("skipped_for_time", []).append(
                f"needed ~{need_s:.0f}s, {max(self.left_s(), 0):.0f}s left")
        return ok

    def record(self, key: str, value: Any) -> None:
        self.result[key] = value
        self.flush()

    def check(self, name: str, ok: bool) -> bool:
        self.checks[name] = bool(ok)
        self.flush()
        return bool(ok)

    def document(self) -> dict[str, Any]:
        return {"step": self.key, "name": self.name, "status": self.status, "toy": self.toy,
                "device": self.device, "budget_s": self.budget_s,
                "wall_s": round(time.monotonic() - self.started, 3), "error": self.error,
                "checks": self.checks, "result": self.result}

    def flush(self) -> None:
        write_json(self.out, self.document())


def median_ms(fn: Callable[[], object], iters: int, warmup: int, cuda: bool) -> float:
    """Median milliseconds of ``fn``: CUDA events around each call on a GPU (device
    work is asynchronous), the wall clock on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    if not cuda:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
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


def copy_bandwidth(nbytes: int, iters: int, device: str) -> dict[str, float]:
    """Device-to-device copy of a random buffer, bytes read + written over the median
    time: the practical ceiling every bandwidth figure of the kit is divided by."""
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), iters, max(2, iters // 10), device == "cuda")
    return {"buffer_bytes": nbytes, "median_ms": ms, "gb_per_s": 2 * nbytes / ms / 1e6}


def versions() -> dict[str, str | None]:
    """Versions of what the kit runs on (None: not importable here)."""
    import importlib
    import platform

    out: dict[str, str | None] = {"python": platform.python_version()}
    for mod in ("torch", "triton", "cupy", "ray", "transformers", "grpc", "numpy"):
        try:
            out[mod] = str(getattr(importlib.import_module(mod), "__version__", "?"))
        except Exception:  # a missing or broken package is a finding, not an error
            out[mod] = None
    try:
        import torch

        out["torch_cuda"] = torch.version.cuda
    except ImportError:
        out["torch_cuda"] = None
    return out
