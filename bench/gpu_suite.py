"""The GPU verification kit: one command that proves the GPU path and records it.

    python bench/gpu_suite.py [--wheels .whl] [--steps a,c] [--out-dir DIR] [--export DIR]
    python bench/gpu_suite.py --dry-run [--out-dir DIR]     # on CPU, in CI
    python bench/gpu_suite.py --list

Runs the steps of bench/gpu_plan.py in order (a environment, b kernels, c engine vs
transformers, d decode roofline, e cuda-ipc transfer, f serving), each in its own
process with its own time budget: a step that fails or overruns is recorded as such
and the next one starts. Each writes ``<key>-<name>.json`` as it goes; the suite adds
``summary.json``, all in bench/results/gpu-<gpu name>/ (``--export DIR`` also packs
them into DIR/gpu-results.tgz and copies the summary there). Nothing comes from a
registry: ``--wheels DIR`` installs carried wheels (bench/gpu_wheels.py builds them) with
pip's --no-index, into the running python's environment (or /tmp/pdserve-site when that
is read-only); every model is dummy weights.

``--dry-run`` checks the kit itself on CPU: every step module imports, the plan fits
its budget, every step's example result passes its schema, the wheels cover what the
GPU image lacks, and every step runs its CPU equivalent at toy size (step a through
the same subprocess path as a real run) with its JSON validated.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: bench/ comes first, the root must too
    sys.path.insert(0, str(ROOT))

from bench.gpu_common import StepContext, slug, write_json  # noqa: E402
from bench.gpu_plan import (  # noqa: E402
    PLAN,
    SUMMARY,
    Step,
    check_plan,
    missing_packages,
    plan_seconds,
    validate,
    validate_step,
)

SITE = Path("/tmp/pdserve-site")
TRITON_CACHE = Path("/tmp/pdserve-triton-cache")  # shared by the steps: compile once
GRACE_S = 12  # after its budget a step gets SIGTERM, then this long to clean up


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="check the kit on CPU")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--steps", default="", help="comma-separated step keys (default: all)")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--wheels", type=Path, default=None, help="install these wheels first")
    p.add_argument("--export", type=Path, default=None, help="pack the results here too")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every step's budget (a rerun with time to spare)")
    # One step, in the process the suite starts for it:
    p.add_argument("--run-step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget-s", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--toy", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _selected(keys: str) -> tuple[Step, ...]:
    want = {k.strip() for k in keys.split(",") if k.strip()}
    unknown = want - {s.key for s in PLAN}
    if unknown:
        sys.exit(f"unknown steps {sorted(unknown)}; the plan has {[s.key for s in PLAN]}")
    return tuple(s for s in PLAN if not want or s.key in want)


# -- one step ----------------------------------------------------------------------------------
def run_step(step: Step, out: Path, budget_s: float, toy: bool) -> dict[str, Any]:
    """Run ``step`` here; its JSON document (also written to ``out``)."""
    device = "cpu"
    if not toy:
        import torch

        device = "cuda" if torch.cuda.is_available() else "none"
    ctx = StepContext(step.key, step.name, out, budget_s, toy, device)
    try:
        if device == "none":
            raise RuntimeError("torch sees no CUDA device")
        importlib.import_module(step.module).run(ctx)
        ctx.status = "ok"
    except SystemExit:  # the suite's SIGTERM at the budget
        ctx.status, ctx.error = "timeout", f"stopped at its budget of {budget_s:.0f}s"
    except BaseException as e:
        ctx.status = "failed"
        ctx.error = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
    ctx.flush()
    return ctx.document()


def _step_main(args: argparse.Namespace) -> int:
    # SIGTERM from the suite becomes SystemExit, so every `finally` (servers, Ray) runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    (step,) = _selected(args.run_step)
    doc = run_step(step, args.out, args.budget_s or step.budget_s, args.toy)
    return 0 if doc["status"] == "ok" else 1


def _step_env(site: Path | None) -> dict[str, str]:
    paths = [str(p) for p in (site, ROOT) if p is not None]
    env = dict(os.environ, PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0",
               TRITON_CACHE_DIR=str(TRITON_CACHE))
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    return env


def spawn_step(step: Step, out: Path, budget_s: float, env: dict[str, str], toy: bool = False
               ) -> tuple[int | None, bool]:
    """Run ``step`` in a process of its own (its own session, so the whole tree it starts
    can be stopped); (return code or None, whether it overran)."""
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--run-step", step.key,
           "--out", str(out), "--budget-s", str(budget_s), *(["--toy"] if toy else [])]
    log = out.with_suffix(".log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=budget_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return None, True
        finally:
            _reap(out.with_suffix(".pids"))


def _reap(pids: Path) -> None:
    """End the process groups a step started in sessions of their own (step f's servers,
    with their Ray) if the step could not: they would hold GPU memory into the next step."""
    if not pids.exists():
        return
    for line in pids.read_text().split():
        with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
            os.killpg(int(line), signal.SIGKILL)
    pids.unlink()


def _collect(step: Step, out: Path, budget_s: float, rc: int | None, overran: bool
             ) -> dict[str, Any]:
    """The step's document, whatever state it was left in."""
    try:
        doc = json.loads(out.read_text())
    except (OSError, ValueError):
        doc = {"step": step.key, "name": step.name, "status": "failed", "toy": False,
               "device": "cuda", "budget_s": budget_s, "wall_s": budget_s, "error": None,
               "checks": {}, "result": {}}
    if overran and doc["status"] != "ok":
        doc["status"], doc["error"] = "timeout", doc["error"] or "killed at its budget"
    elif doc["status"] not in ("ok", "failed", "timeout"):
        doc["status"] = "failed"
    if doc["status"] != "ok" and not doc["error"]:
        tail = out.with_suffix(".log").read_text(errors="replace")[-2000:] \
            if out.with_suffix(".log").exists() else ""
        doc["error"] = f"exit code {rc}; log tail:\n{tail}"
    write_json(out, doc)
    return doc


# -- the summary ---------------------------------------------------------------------------
def summarize(docs: list[tuple[Step, dict[str, Any]]], gpu: str, toy: bool, started: str,
              wall_s: float, command: str) -> dict[str, Any]:
    steps = []
    for step, doc in docs:
        module = importlib.import_module(step.module)
        errors = validate_step(doc, module.SCHEMA)
        try:
            head = module.headline(doc["result"]) if doc["status"] == "ok" else {}
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            head, errors = {}, [*errors, f"headline: {e!r}"]
        steps.append({"step": step.key, "name": step.name, "status": doc["status"],
                      "budget_s": doc["budget_s"], "wall_s": doc["wall_s"],
                      "file": step.filename, "error": (doc["error"] or "")[:500] or None,
                      "failed_checks": sorted(k for k, v in doc["checks"].items() if not v),
                      "schema_errors": errors[:20], "headline": head})
    return {"gpu": gpu, "toy": toy, "command": command, "started": started,
            "wall_s": wall_s, "plan_budget_s": plan_seconds(tuple(s for s, _ in docs)),
            "code": _code(), "steps": steps,
            "all_ok": bool(steps) and all(s["status"] == "ok" and not s["failed_checks"]
                                          and not s["schema_errors"] for s in steps)}


def _code() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=20, check=False).stdout.strip()
        except OSError:
            return ""

    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def table(summary: dict[str, Any]) -> str:
    lines = [f"GPU kit on {summary['gpu']}: {'ALL OK' if summary['all_ok'] else 'NOT OK'} "
             f"in {summary['wall_s']:.0f}s (plan {summary['plan_budget_s']}s)"]
    for s in summary["steps"]:
        head = ", ".join(f"{k}={_fmt(v)}" for k, v in s["headline"].items())
        bad = s["failed_checks"] + s["schema_errors"][:2]
        lines.append(f"  {s['step']} {s['name']:<9} {s['status']:<8} {s['wall_s']:6.1f}/"
                     f"{s['budget_s']:.0f}s  {head}" + (f"  FAILED: {bad}" if bad else ""))
        if s["error"]:
            lines.append(f"      error: {s['error'].splitlines()[0][:200]}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# -- the whole run -----------------------------------------------------------------------------
def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown-gpu"


def _install_wheels(wheels: Path) -> tuple[str, Path | None]:
    """Install the carried wheels, no registry: into this python's own environment when
    it is writable (then Ray's workers and the servers the steps start find them with no
    PYTHONPATH), else into SITE for the steps' PYTHONPATH. (message, SITE or None)."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        return f"no wheels in {wheels}", None
    base = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
            "--no-compile", "--no-cache-dir", "--disable-pip-version-check"]
    run = subprocess.run([*base, *files], capture_output=True, text=True, check=False)
    if run.returncode == 0:
        return f"installed {len(files)} wheels into {sys.prefix}", None
    run2 = subprocess.run([*base, "--upgrade", "--target", str(SITE), *files],
                          capture_output=True, text=True, check=False)
    if run2.returncode == 0:
        return f"installed {len(files)} wheels into {SITE} ({sys.prefix}: " \
               f"{run.stderr.strip()[-300:]})", SITE
    return f"pip install failed ({run2.returncode}): {run2.stderr[-1500:]}", None


def real_run(args: argparse.Namespace, command: str) -> int:
    steps = _selected(args.steps)
    gpu = _gpu_name()
    out_dir = args.out_dir or ROOT / "bench" / "results" / f"gpu-{slug(gpu)}"
    out_dir.mkdir(parents=True, exist_ok=True)
    site = None
    if args.wheels is not None:
        message, site = _install_wheels(args.wheels)
        print(f"[gpu-kit] {message}", flush=True)
    env = _step_env(site)
    t0, started = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    docs = []
    for step in steps:
        budget = step.budget_s * args.budget_scale
        print(f"[gpu-kit] {step.key} {step.name}: {step.measures} (budget {budget:.0f}s)",
              flush=True)
        out = out_dir / step.filename
        rc, overran = spawn_step(step, out, budget, env)
        doc = _collect(step, out, budget, rc, overran)
        print(f"[gpu-kit] {step.key} {step.name}: {doc['status']} in {doc['wall_s']:.1f}s",
              flush=True)
        docs.append((step, doc))
    summary = summarize(_with_earlier(docs, out_dir), gpu, False, started,
                        time.monotonic() - t0, command)
    write_json(out_dir / "summary.json", summary)
    if args.export is not None:
        _export(out_dir, args.export)
    print(table(summary), flush=True)
    return 0 if summary["all_ok"] else 1


def _with_earlier(docs: list[tuple[Step, dict[str, Any]]], out_dir: Path
                  ) -> list[tuple[Step, dict[str, Any]]]:
    """This run's steps, and in their place in the plan the results an earlier run left
    in ``out_dir`` (a rerun of the failed steps still summarizes the whole kit)."""
    fresh = {step.key: doc for step, doc in docs}
    out = []
    for step in PLAN:
        if step.key in fresh:
            out.append((step, fresh[step.key]))
            continue
        try:
            out.append((step, json.loads((out_dir / step.filename).read_text())))
        except (OSError, ValueError):
            continue
    return out


def _export(out_dir: Path, dest: Path) -> None:
    """One archive of the results folder (the device tool brings back 8 files at most)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest / "gpu-results.tgz", "w:gz") as tar:
        tar.add(out_dir, arcname=out_dir.name)
    (dest / "gpu-summary.json").write_text((out_dir / "summary.json").read_text())


def dry_run(args: argparse.Namespace, command: str) -> int:
    from bench.gpu_wheels import WHEELS

    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="pdserve-gpu-dry-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = [f"plan: {p}" for p in check_plan()]
    problems += [f"wheels: {d} is neither in the GPU image nor among the wheels"
                 for d in missing_packages(WHEELS)]
    for step in PLAN:
        try:
            module = importlib.import_module(step.module)
        except Exception as e:
            problems.append(f"{step.key}: {step.module} does not import: {e!r}")
            continue
        fake = {"step": step.key, "name": step.name, "status": "ok", "toy": False,
                "device": "cuda", "budget_s": step.budget_s, "wall_s": 1.0, "error": None,
                "checks": {}, "result": module.FAKE}
        problems += [f"{step.key} fake result: {e}" for e in validate_step(fake, module.SCHEMA)]
        head = {"h": module.headline(module.FAKE)}
        problems += [f"{step.key} fake headline: {e}" for e in
                     validate(head, {"h": SUMMARY["steps"][0]["headline"]})]
    t0, started = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    docs = []
    for step in PLAN:  # the CPU equivalents at toy size; step a as a real run starts it
        out = out_dir / step.filename
        if step.key == "a":
            rc, overran = spawn_step(step, out, 120, _step_env(None), toy=True)
            doc = _collect(step, out, 120, rc, overran)
        else:
            doc = run_step(step, out, 120, toy=True)
        docs.append((step, doc))
        print(f"[gpu-kit dry run] {step.key} {step.name}: {doc['status']} in "
              f"{doc['wall_s']:.1f}s", flush=True)
    summary = summarize(docs, "cpu (dry run)", True, started, time.monotonic() - t0, command)
    write_json(out_dir / "summary.json", summary)
    problems += [f"summary: {e}" for e in validate(summary, SUMMARY)]
    for s in summary["steps"]:
        if s["status"] != "ok" or s["failed_checks"] or s["schema_errors"]:
            problems.append(f"{s['step']} toy run: {s['status']} {s['failed_checks']} "
                            f"{s['schema_errors']} {s['error'] or ''}"[:1500])
    print(table(summary))
    print(f"[gpu-kit dry run] results in {out_dir}")
    for p in problems:
        print(f"[gpu-kit dry run] PROBLEM {p}")
    print(f"[gpu-kit dry run] {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    command = shlex.join(["python", "bench/gpu_suite.py", *argv])
    if args.run_step:
        return _step_main(args)
    if args.list:
        for s in PLAN:
            print(f"{s.key} {s.name:<9} {s.budget_s:4d}s  {s.measures}")
        print(f"total with start-up: {plan_seconds()}s")
        return 0
    if args.dry_run:
        return dry_run(args, command)
    return real_run(args, command)


if __name__ == "__main__":
    sys.exit(main())
