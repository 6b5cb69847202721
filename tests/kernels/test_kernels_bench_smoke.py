"""bench/kernels.py runs end to end (tiny shapes, CPU interpreter), so it is ready for a GPU.

Its timings here mean nothing; what is checked is that every measurement runs, that the
kernels it times agree with the references it compares them to, and the JSON it writes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from paged_cases import DEVICE

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU, run bench/kernels.py itself")
def test_bench_kernels_cpu_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kernels-cpu.json"
    bench.main(["--cpu-smoke", "--out", str(out), "--batch", "3", "--context", "70",
                "--q-heads", "4", "--kv-heads", "2", "--head-dim", "32", "--prefill-seqs", "2",
                "--prefill-len", "37", "--iters", "1", "--warmup", "0", "--copy-mib", "1",
                "--sweep"])
    result = json.loads(out.read_text())
    assert "--cpu-smoke" in result["command"]
    dec, pre = result["decode"], result["prefill"]
    assert dec["bytes_moved"] == 3 * 70 * 2 * 32 * 2 * 2 + 2 * 3 * 4 * 32 * 2
    assert dec["max_abs_err_vs_torch"] < 2e-2  # bf16
    assert pre["max_abs_err_vs_sdpa"] < 2e-2
    assert len(dec["sweep"]) == 5 * 3
    for key in ("triton", "torch_gather_sdpa"):
        assert dec[key]["median_ms"] > 0
