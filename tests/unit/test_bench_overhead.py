"""bench/overhead.py's pieces that decide its figures: the workload is W2, CPU time is
split by process kind, and py-spy's stacks are read into forward/step shares."""

from __future__ import annotations

import os
from pathlib import Path

from bench.offline import workload as offline_workload
from bench.overhead import cpu_split, lengths, session_cpu, top_frames


def test_the_32_stream_lengths_are_the_offline_benchmarks_w2() -> None:
    _, w2 = offline_workload(32)
    assert lengths(32) == w2
    assert sum(lengths(128)) > 0 and min(lengths(128)) == 16 and max(lengths(128)) == 160


def test_cpu_split_adds_up_by_kind_and_counts_processes_that_appeared() -> None:
    before = {1: ("router", 1.0), 2: ("decode", 5.0), 3: ("ray", 0.5)}
    after = {1: ("router", 1.5), 2: ("decode", 7.0), 3: ("ray", 0.75), 4: ("ray", 0.25)}
    assert cpu_split(before, after) == {"router": 0.5, "decode": 2.0, "ray": 0.5}


def test_session_cpu_finds_this_process_in_its_session() -> None:
    procs = session_cpu(os.getsid(0))
    assert os.getpid() in procs
    kind, cpu = procs[os.getpid()]
    assert cpu > 0 and kind in ("router", "ray")


def test_top_frames_reads_forward_and_step_shares(tmp_path: Path) -> None:
    step = ("process 1:main;thread (0x1): engine;EngineLoop._run (engine/engine_loop.py:95);"
            "LLMEngine.step (engine/llm_engine.py:268)")
    f = tmp_path / "w.txt"
    f.write_text(
        f"{step};ModelRunner.execute (engine/model_runner.py:70);mm (torch/_ops.py:1) 6\n"
        f"{step};ModelRunner.execute (engine/model_runner.py:78);sample (s.py:1) 2\n"
        f"{step};LLMEngine._postprocess (engine/llm_engine.py:322) 1\n"
        "process 1:main;Worker.main_loop (ray/_private/worker.py:1069) 1\n")
    t = top_frames(f)
    assert t["samples"] == 10
    assert t["forward_share"] == 0.8 and t["engine_step_share"] == 0.9
    assert t["top_self"][0] == ["mm (torch/_ops.py:1)", 0.6]
