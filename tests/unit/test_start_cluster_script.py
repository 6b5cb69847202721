"""cluster/start-cluster.sh without Ray: what it hands to `ray start` and `pdserve serve`
(a recording `ray` and `pdserve` on PATH), and that `stop` with RAY_TEMP_DIR ends the
processes under that directory, the node's Ray client server and their children, and
nothing else. The real thing, with Ray, is tests/e2e/test_start_cluster.py (slow tier)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "cluster" / "start-cluster.sh"
RECORDER = '#!/bin/sh\nfor a; do echo "$a"; done >>"$RECORD.$(basename "$0")"\n'


def _run(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for tool in ("ray", "pdserve"):
            (bin_dir / tool).write_text(RECORDER)
            (bin_dir / tool).chmod(0o755)
    full = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp), "RECORD": str(tmp / "rec"),
            **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True,
                          text=True, timeout=60)


def _recorded(tmp: Path, tool: str) -> list[str]:
    path = tmp / f"rec.{tool}"
    return path.read_text().splitlines() if path.exists() else []


def test_head_serves_rays_metrics_and_the_discovery_file(tmp_path: Path) -> None:
    r = _run(tmp_path, "head", "--num-cpus=0", RAY_TEMP_DIR=str(tmp_path / "ray"),
             RAY_METRICS_PORT="18080")
    assert r.returncode == 0, r.stderr
    args = _recorded(tmp_path, "ray")
    # First the token (token auth, made only if missing), then `ray start`.
    assert args[:2] == ["get-auth-token", "--generate"]
    start = args[2:]
    assert start[:2] == ["start", "--head"]
    for want in ("--metrics-export-port=18080", "--include-dashboard=true",
                 "--dashboard-host=127.0.0.1", f"--temp-dir={tmp_path / 'ray'}",
                 "--num-cpus=0", "--num-gpus=0"):
        assert want in start, (want, start)


def test_worker_joins_the_head_with_its_metrics_port(tmp_path: Path) -> None:
    r = _run(tmp_path, "worker", "10.1.2.3", "--resources={\"x\": 1}", RAY_PORT="7000")
    assert r.returncode == 0, r.stderr
    assert _recorded(tmp_path, "ray") == [
        "start", "--address=10.1.2.3:7000", "--metrics-export-port=8080", "--resources={\"x\": 1}"]
    assert _run(tmp_path, "worker").returncode != 0  # HEAD_IP is required


def test_serve_joins_the_head_started_under_the_same_temp_dir(tmp_path: Path) -> None:
    ray_dir = tmp_path / "ray"
    ray_dir.mkdir()
    (ray_dir / "ray_current_cluster").write_text("10.9.8.7:6380")
    r = _run(tmp_path, "serve", "--port", "1234", RAY_TEMP_DIR=str(ray_dir))
    assert r.returncode == 0, r.stderr
    assert _recorded(tmp_path, "pdserve") == [
        "serve", "--ray-address", "10.9.8.7:6380", "--host", "0.0.0.0", "--port", "1234"]
    assert (ray_dir / "pdserve.pid").read_text().strip().isdigit()
    r = _run(tmp_path, "serve", RAY_TEMP_DIR=str(ray_dir), RAY_ADDRESS="h:1",
             PDSERVE_HOST="127.0.0.1")
    assert _recorded(tmp_path, "pdserve")[-5:] == [
        "serve", "--ray-address", "h:1", "--host", "127.0.0.1"]


def _spawn(tmp: Path, tag: str) -> subprocess.Popen[bytes]:
    """A process whose command line names `tag` (a Ray daemon naming its session dir)
    with a child that does not (an agent or worker renamed to ray::...)."""
    return subprocess.Popen(
        ["bash", "-c", f'sleep 300 & wait; : "{tag}"'], start_new_session=True)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def _wait_child(pid: int) -> int:
    for _ in range(100):
        kids = _children(pid)
        if kids:
            return kids[0]
        time.sleep(0.05)
    raise AssertionError("no child")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_stop_with_a_temp_dir_ends_only_its_processes(tmp_path: Path) -> None:
    mine_dir, other_dir = tmp_path / "node-a", tmp_path / "node-b"
    mine = _spawn(tmp_path, f"{mine_dir}/session_x/logs")
    other = _spawn(tmp_path, f"{other_dir}/session_y/logs")
    try:
        mine_child, other_child = _wait_child(mine.pid), _wait_child(other.pid)
        r = _run(tmp_path, "stop", RAY_TEMP_DIR=str(mine_dir), RAY_STOP_GRACE_S="5")
        assert r.returncode == 0, r.stderr
        mine.wait(10)
        assert _gone(mine.pid) and _gone(mine_child)
        assert other.poll() is None and not _gone(other_child)
        assert _recorded(tmp_path, "ray") == []  # never a machine-wide `ray stop`
    finally:
        for p in (mine, other):
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(10)


def _named(argv: str) -> subprocess.Popen[bytes]:
    """A process whose command line reads `argv` (one that does not name any temp dir)."""
    return subprocess.Popen(["bash", "-c", f"exec -a '{argv}' sleep 300"],
                            start_new_session=True)


def test_stop_with_a_temp_dir_ends_its_nodes_ray_client_server(tmp_path: Path) -> None:
    """`ray start --head` leaves `python -m ray.util.client.server` an orphan whose command
    line names the GCS address and its node's id, not the temp dir: `stop` finds it by the
    node id the raylet under the directory names, and leaves another node's alone."""
    mine_dir, mine_id, other_id = tmp_path / "head", "ab12" * 14, "cd34" * 14
    raylet = _spawn(tmp_path, f"{mine_dir}/session_x/sockets/raylet --node_id={mine_id}")
    client = "python -m ray.util.client.server --address=10.0.0.1:6391 --port=10391"
    mine = _named(f"{client} --mode=proxy --node-id={mine_id}")
    other = _named(f"{client} --mode=proxy --node-id={other_id}")
    # An id that merely starts with this node's is another node's.
    longer = _named(f"{client} --mode=proxy --node-id={mine_id}ef")
    try:
        time.sleep(0.3)
        r = _run(tmp_path, "stop", RAY_TEMP_DIR=str(mine_dir), RAY_STOP_GRACE_S="5")
        assert r.returncode == 0, r.stderr
        assert raylet.wait(10) is not None and mine.wait(10) == -15
        assert other.poll() is None and longer.poll() is None
    finally:
        for p in (raylet, mine, other, longer):
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(10)


def test_stop_signals_its_pdserve_and_clears_the_pid_file(tmp_path: Path) -> None:
    ray_dir = tmp_path / "ray"
    ray_dir.mkdir()
    # Named as `serve` leaves it after exec: `pdserve serve ...`.
    fake = subprocess.Popen(["bash", "-c", "exec -a 'pdserve serve --port 1' sleep 300"],
                            start_new_session=True)
    try:
        time.sleep(0.3)
        (ray_dir / "pdserve.pid").write_text(f"{fake.pid}\n")
        r = _run(tmp_path, "stop", RAY_TEMP_DIR=str(ray_dir), RAY_STOP_GRACE_S="5")
        assert r.returncode == 0, r.stderr
        assert fake.wait(10) == -15  # SIGTERM: pdserve drains on it
        assert not (ray_dir / "pdserve.pid").exists()
    finally:
        if fake.poll() is None:
            fake.kill()
            fake.wait(10)
