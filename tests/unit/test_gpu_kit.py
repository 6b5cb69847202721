"""The GPU verification kit (bench/gpu_suite.py) on CPU: its plan, its schemas, its
bookkeeping of steps that fail or overrun, and the whole dry run -- so the kit cannot
fail on a typo when a GPU is finally lent."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_plan
from bench.gpu_kernels_step import count_outcomes
from bench.gpu_plan import PLAN, Step, check_plan, missing_packages, plan_seconds, validate
from bench.gpu_suite import _collect, _reap, _with_earlier, spawn_step, summarize
from bench.gpu_wheels import EXTRA, WHEELS

ROOT = Path(__file__).resolve().parents[2]


def test_the_plan_is_the_issue_order_and_fits_eight_minutes() -> None:
    assert [s.key for s in PLAN] == ["a", "b", "c", "d", "e", "f"]
    assert check_plan() == []
    assert plan_seconds() <= gpu_plan.TOTAL_BUDGET_S == 480


def test_check_plan_names_what_is_wrong() -> None:
    slow = tuple(Step(s.key, s.name, s.module, 200, s.measures) for s in PLAN)
    assert any("over the 480 s budget" in p for p in check_plan(slow))
    swapped = (PLAN[1], PLAN[0])
    assert any("in order" in p for p in check_plan(swapped))
    assert check_plan((Step("a", "x", "m", 0, ""),)) == ["step a has no time budget"]


def test_validate_reports_every_departure() -> None:
    spec = {"n": gpu_plan.NUM, "?opt": str, "rows": [{"ok": bool}], "map": {"*": int}}
    assert validate({"n": 1.5, "rows": [{"ok": True}], "map": {"a": 1}}, spec) == []
    errors = validate({"n": True, "rows": [{"ok": 1}], "map": {"a": "x"}, "opt": 3}, spec)
    assert errors == ["$.n: expected int or float, got bool", "$.opt: expected str, got int",
                      "$.rows[0].ok: expected bool, got int", "$.map.a: expected int, got str"]
    assert validate({}, spec)[0] == "$: missing key 'n'"


@pytest.mark.parametrize("step", PLAN, ids=lambda s: s.name)
def test_each_steps_example_result_fits_its_schema(step: Step) -> None:
    module = importlib.import_module(step.module)
    assert validate(module.FAKE, module.SCHEMA) == []
    head = module.headline(module.FAKE)
    assert validate(head, {"*": (int, float, str, bool, type(None))}) == []
    broken = dict(module.FAKE)
    broken.pop(next(iter(module.SCHEMA)))
    assert validate(broken, module.SCHEMA)  # a missing key is caught


def test_the_wheels_cover_what_the_gpu_image_lacks() -> None:
    assert missing_packages(WHEELS) == []
    # Without our extras the router's HTTP edge would not import on the GPU machine.
    assert missing_packages(WHEELS - set(EXTRA)) == ["starlette", "uvicorn"]


def test_pytest_output_is_counted_whole_or_cut_off() -> None:
    whole = ("tests/kernels/t.py::a PASSED\ntests/kernels/t.py::b FAILED\n"
             "FAILED tests/kernels/t.py::b - boom\n=== 1 failed, 1 passed, 2 skipped in 9.1s ===")
    assert count_outcomes(whole) == ({"failed": 1, "passed": 1, "skipped": 2},
                                     ["tests/kernels/t.py::b"])
    cut = "[gw0] [ 10%] PASSED tests/kernels/t.py::a\n[gw1] [ 20%] PASSED tests/kernels/t.py::c\n"
    assert count_outcomes(cut) == ({"passed": 2}, [])


def test_a_step_killed_at_its_budget_is_recorded_as_a_timeout(tmp_path: Path) -> None:
    step = PLAN[0]
    out = tmp_path / step.filename
    # The step's interpreter hangs at start-up (a sitecustomize that sleeps), so it is
    # killed at its budget however fast the machine is.
    (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(600)\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    rc, overran = spawn_step(step, out, 0.3, env, toy=True)
    doc = _collect(step, out, 0.3, rc, overran)
    assert overran and rc is None
    assert doc["status"] == "timeout" and doc["error"]
    assert json.loads(out.read_text())["status"] == "timeout"


def test_a_partial_document_becomes_failed_and_the_summary_says_so(tmp_path: Path) -> None:
    step = PLAN[4]
    out = tmp_path / step.filename
    out.write_text(json.dumps({"step": "e", "name": "transfer", "status": "running",
                               "toy": False, "device": "cuda", "budget_s": 44, "wall_s": 3,
                               "error": None, "checks": {"transfers_exact": False},
                               "result": {"sizes": []}}))
    out.with_suffix(".log").write_text("Traceback ...\nRuntimeError: boom\n")
    doc = _collect(step, out, 44, 1, False)
    assert doc["status"] == "failed" and "RuntimeError: boom" in doc["error"]
    summary = summarize([(step, doc)], "gpu", False, "now", 3.0, "cmd")
    assert not summary["all_ok"]
    assert summary["steps"][0]["failed_checks"] == ["transfers_exact"]
    assert validate(summary, gpu_plan.SUMMARY) == []


def test_the_dry_run_passes(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "bench/gpu_suite.py", "--dry-run", "--out-dir",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["toy"] and summary["all_ok"]
    assert [s["status"] for s in summary["steps"]] == ["ok"] * len(PLAN)
    for step in PLAN:
        assert json.loads((tmp_path / step.filename).read_text())["toy"] is True


def test_a_rerun_of_some_steps_still_summarizes_the_whole_kit(tmp_path: Path) -> None:
    for step in PLAN[:3]:
        (tmp_path / step.filename).write_text(json.dumps({"step": step.key, "old": True}))
    rerun = [(PLAN[1], {"step": "b", "old": False})]
    merged = _with_earlier(rerun, tmp_path)
    assert [(s.key, d["old"]) for s, d in merged] == [("a", True), ("b", False), ("c", True)]


def test_process_groups_a_step_left_behind_are_ended(tmp_path: Path) -> None:
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)  # like a server
    pids = tmp_path / "f-serving.pids"
    pids.write_text(f"{orphan.pid}\n999999999\n")  # the second is long gone
    _reap(pids)
    assert orphan.wait(timeout=10) == -9 and not pids.exists()
