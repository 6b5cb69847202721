"""Step b: the Triton kernels compiled and run on the GPU, then timed.

1. tests/kernels with every tensor on the GPU (what bench/gpu_check_kernels.py runs:
   PDSERVE_KERNEL_DEVICE=cuda, no interpreter), spread over pytest-xdist workers when
   the image has it. The CPU-only files (native C kernels, oneDNN prepack, the sm_90 AOT
   compile, the interpreter smoke run) are left out: they do not touch the GPU. Output
   is streamed to a log and counted line by line, so a run cut at its budget still says
   how far it got.
2. bench/kernels.py: decode attention bandwidth against the copy bandwidth, the torch
   path on the same data, prefill against SDPA; its JSON is embedded here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.gpu_common import ROOT, StepContext
from bench.gpu_plan import NUM, OPT_NUM

CPU_ONLY_TESTS = ("test_kernels_compile.py", "test_kernels_cpu_native.py",
                  "test_kernels_prepacked_linear.py", "test_kernels_bench_smoke.py")

SCHEMA: dict[str, Any] = {
    "tests": {"command": str, "returncode": OPT_NUM, "timed_out": bool,
              "counts": {"*": NUM}, "failed": [str], "log_tail": str},
    "bench": {"command": str, "returncode": OPT_NUM, "timed_out": bool,
              "copy_gb_per_s": OPT_NUM, "decode_gb_per_s": OPT_NUM,
              "decode_fraction_of_copy": OPT_NUM, "decode_speedup_vs_torch": OPT_NUM,
              "decode_max_abs_err": OPT_NUM, "prefill_tflop_per_s": OPT_NUM,
              "sdpa_tflop_per_s": OPT_NUM, "prefill_time_over_sdpa": OPT_NUM,
              "prefill_max_abs_err": OPT_NUM, "raw": (dict, type(None))},
}

FAKE: dict[str, Any] = {
    "tests": {"command": "python -m pytest tests/kernels", "returncode": 0,
              "timed_out": False, "counts": {"passed": 420, "failed": 0, "skipped": 3},
              "failed": [], "log_tail": "420 passed in 61.2s"},
    "bench": {"command": "python bench/kernels.py", "returncode": 0, "timed_out": False,
              "copy_gb_per_s": 4300.0, "decode_gb_per_s": 3600.0,
              "decode_fraction_of_copy": 0.84, "decode_speedup_vs_torch": 4.1,
              "decode_max_abs_err": 0.004, "prefill_tflop_per_s": 410.0,
              "sdpa_tflop_per_s": 520.0, "prefill_time_over_sdpa": 1.27,
              "prefill_max_abs_err": 0.008, "raw": {}},
}


def headline(r: dict[str, Any]) -> dict[str, Any]:
    c, b = r["tests"]["counts"], r["bench"]
    return {"tests_passed": c.get("passed", 0), "tests_failed": c.get("failed", 0)
            + c.get("error", 0), "decode_fraction_of_copy": b["decode_fraction_of_copy"],
            "prefill_time_over_sdpa": b["prefill_time_over_sdpa"]}


_OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_FAILED_ID = re.compile(r"(?:FAILED|ERROR) (tests/\S+)")
_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)")


def count_outcomes(log: str) -> tuple[dict[str, int], list[str]]:
    """Outcome counts and failed test ids from pytest -v output (partial or whole). The
    final summary line wins when there is one; otherwise the per-test lines count."""
    counts: dict[str, int] = {}
    summary = [line for line in log.splitlines() if re.search(r" in [\d.]+s", line)
               and _SUMMARY.search(line)]
    if summary:
        for n, kind in _SUMMARY.findall(summary[-1]):
            counts["error" if kind.startswith("error") else kind] = int(n)
    else:
        for m in _OUTCOME.findall(log):
            kind = m.lower()
            counts[kind] = counts.get(kind, 0) + 1
    failed = sorted(set(_FAILED_ID.findall(log)))
    return counts, failed


def _run_logged(cmd: list[str], log: Path, timeout_s: float, env: dict[str, str]
                ) -> tuple[int | None, bool, str]:
    """Run with output to ``log``; (returncode or None, timed out, output)."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=max(timeout_s, 1.0))
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc, timed_out = None, True
    return rc, timed_out, log.read_text(errors="replace")


def _pytest_cmd() -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-v", "-p", "no:cacheprovider",
           "-rfE", *(f"--ignore=tests/kernels/{f}" for f in CPU_ONLY_TESTS)]
    if importlib.util.find_spec("xdist") is not None:
        # Compiling is most of the time; 8 processes compile in parallel on 16 cores.
        cmd += ["-n", "8"]
    return cmd


def _bench_summary(raw: dict[str, Any] | None) -> dict[str, Any]:
    if not raw:
        return dict.fromkeys(("copy_gb_per_s", "decode_gb_per_s", "decode_fraction_of_copy",
                              "decode_speedup_vs_torch", "decode_max_abs_err",
                              "prefill_tflop_per_s", "sdpa_tflop_per_s",
                              "prefill_time_over_sdpa", "prefill_max_abs_err"))
    dec, pre = raw["decode"], raw["prefill"]
    return {"copy_gb_per_s": raw["device_copy"]["gb_per_s"],
            "decode_gb_per_s": dec["triton"]["gb_per_s"],
            "decode_fraction_of_copy": dec["triton"]["fraction_of_copy_bw"],
            "decode_speedup_vs_torch": dec["speedup_vs_torch"],
            "decode_max_abs_err": dec["max_abs_err_vs_torch"],
            "prefill_tflop_per_s": pre["triton_paged"]["tflop_per_s"],
            "sdpa_tflop_per_s": pre["torch_sdpa_contiguous"]["tflop_per_s"],
            "prefill_time_over_sdpa": pre["triton_over_sdpa_time"],
            "prefill_max_abs_err": pre["max_abs_err_vs_sdpa"]}


_CANNED = """tests/kernels/test_kernels_cache.py::test_store PASSED [ 50%]
tests/kernels/test_kernels_cache.py::test_gather FAILED [100%]
FAILED tests/kernels/test_kernels_cache.py::test_gather - AssertionError
1 failed, 1 passed in 3.21s
"""


def run(ctx: StepContext) -> None:
    logs = ctx.out.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PDSERVE_KERNEL_DEVICE"] = "cuda"
    cmd = _pytest_cmd()
    if ctx.toy:  # the dry run checks the command and the parser, not the kernels
        counts, failed = count_outcomes(_CANNED)
        ctx.check("parser_counts_canned_output", counts == {"failed": 1, "passed": 1}
                  and failed == ["tests/kernels/test_kernels_cache.py::test_gather"])
        ctx.record("tests", {"command": " ".join(cmd[2:]), "returncode": 1,
                             "timed_out": False, "counts": counts, "failed": failed,
                             "log_tail": _CANNED})
        from bench.kernels import _parse

        _parse(["--iters", "20", "--out", str(logs / "kernels-bench.json")])
        ctx.record("bench", {"command": "python bench/kernels.py", "returncode": None,
                             "timed_out": False, **_bench_summary(None), "raw": None})
        return
    rc, timed_out, log = _run_logged(cmd, logs / "b-kernel-tests.log",
                                     min(75.0, ctx.left_s() - 22), env)
    counts, failed = count_outcomes(log)
    ctx.record("tests", {"command": " ".join(cmd[2:]), "returncode": rc,
                         "timed_out": timed_out, "counts": counts, "failed": failed,
                         "log_tail": log[-4000:]})
    ctx.check("kernel_tests_pass", rc == 0)
    bench_json = logs / "kernels-bench.json"
    bcmd = [sys.executable, "bench/kernels.py", "--iters", "50", "--out", str(bench_json)]
    rc, timed_out, blog = _run_logged(bcmd, logs / "b-kernel-bench.log", ctx.left_s(), env)
    raw = json.loads(bench_json.read_text()) if rc == 0 and bench_json.exists() else None
    ctx.record("bench", {"command": " ".join(bcmd[1:]), "returncode": rc,
                         "timed_out": timed_out, **_bench_summary(raw), "raw": raw})
    if raw is None:
        ctx.result["bench_log_tail"] = blog[-3000:]
    ctx.check("kernel_bench_ran", raw is not None)
