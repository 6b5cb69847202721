"""runtime/memory_diag.py: off unless asked; a record says what grew and where."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from runtime import memory_diag
from runtime.memory_diag import MemoryDiag


def test_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(memory_diag.ENV_DIR, raising=False)
    assert memory_diag.start_from_env("prefill-0") is None


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_records_growth_sites_types_and_garbage(tmp_path: Path) -> None:
    diag = MemoryDiag(tmp_path / "w.jsonl", interval_s=3600, collect=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "w.jsonl").exists():  # the first record: at once, its thread
            assert time.monotonic() < deadline
            time.sleep(0.05)
        kept = [[i] for i in range(5000)]  # noqa: F841 -- kept alive: must show as growth
        for _ in range(7):
            _Cycle()
        rec = diag.record()
    finally:
        diag.stop()
    assert rec["malloc_in_use_mb"] > 0 and rec["malloc_held_mb"] >= rec["malloc_in_use_mb"]
    assert rec["rssanon_mb"] > 0 and rec["malloc_arena_in_use_mb"][0] > 0
    # Among the top growth sites, not necessarily the first: in a full test run other
    # threads (an import, a library's buffers) may allocate more in the same window.
    ours = [x for x in rec["sites_since_first"]
            if x["site"].endswith(f"{Path(__file__).name}:32")]
    assert ours and ours[0]["kb_diff"] > 200  # 5000 one-item lists
    assert rec["types_since_first"]["list"] >= 5000
    assert rec["gc_garbage_types"]["_Cycle"] == 7
    first = json.loads((tmp_path / "w.jsonl").read_text().splitlines()[0])
    assert "error" not in first
    assert memory_diag.latest(tmp_path)["w"]["t_s"] == first["t_s"]
