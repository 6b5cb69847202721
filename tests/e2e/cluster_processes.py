"""The processes of one Ray node started with ``ray start --temp-dir DIR``, found the way
``cluster/start-cluster.sh stop`` finds them: those whose command line names DIR (GCS,
raylet, dashboard, monitors) and all their descendants (agents and workers rename
themselves, so only their parents show DIR)."""

from __future__ import annotations

import os
from pathlib import Path


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process readable now."""
    out: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            # The command may hold spaces and parentheses: the ppid is after the last ')'.
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        out[int(entry)] = (ppid, cmd)
    return out


def ray_processes_under(temp_dir: Path) -> set[int]:
    procs = _processes()
    mine = {pid for pid, (_, cmd) in procs.items() if f"{temp_dir}/" in cmd}
    mine.discard(os.getpid())
    grown = True
    while grown:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in mine and pid not in mine}
        mine |= more
        grown = bool(more)
    return mine
