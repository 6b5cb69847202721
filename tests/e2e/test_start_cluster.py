"""The operator's path, on one machine: ``cluster/start-cluster.sh head``, ``worker`` (a
second Ray node: its own raylet, object store, ports and temp dir), ``serve`` (pdserve as
the cluster's driver, prefill on one node and decode on the other through the placement
flags), a gRPC client's greedy answer equal to the offline engine's, Ray's node metrics
and pdserve's in one Prometheus configured from cluster/prometheus.yml, and ``stop``
leaving no process of either node or of pdserve behind.

Slow tier: two ``ray start`` (each with its dashboard agent) and a driver take one to
three minutes on a busy two-core machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine import LLM
from engine.sampling_params import SamplingParams
from proto.pdserve.v1 import generation_pb2 as pb
from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc
from tests.e2e.cluster_processes import ray_processes_under
from tests.e2e.grpc_dashboard import dashboard_exprs
from tests.e2e.grpc_fixtures import free_port
from tests.e2e.prometheus_server import PrometheusServer, install_prometheus

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "start-cluster.sh"
MODEL = "dummy:tiny-llama3"
API_KEY = "start-cluster-test-key"
PREFILL_LABEL, DECODE_LABEL = "sc_prefill_node", "sc_decode_node"
PROMPTS = [[(i * 41 + k * 13) % 500 + 3 for k in range(18 + i * 9)] for i in range(3)]
MAX_TOKENS = 16
STORE = str(100 * 1024 * 1024)  # bytes per node: Ray's minimum is 75 MiB


@dataclass
class Node:
    temp_dir: Path
    env: dict[str, str]


@dataclass
class Deployment:
    head: Node
    worker: Node
    grpc_port: int
    metrics_port: int
    serve: subprocess.Popen[bytes]
    serve_log: Path
    tracked: set[int] = field(default_factory=set)  # every pid of both nodes seen so far

    def nodes(self) -> list[Node]:
        return [self.worker, self.head]  # stop order: workers first, while the GCS lives

    def track(self) -> set[int]:
        for n in self.nodes():
            self.tracked |= ray_processes_under(n.temp_dir)
        return self.tracked


def _env(temp_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               RAY_TEMP_DIR=str(temp_dir), PDSERVE_API_KEY=API_KEY, PDSERVE_HOST="127.0.0.1",
               RAY_STOP_GRACE_S="20", PDSERVE_STOP_S="60")
    env.pop("RAY_ADDRESS", None)  # `serve` must find the head that `head` started
    env.update(extra)
    return env


def _run(node: Node, *args: str, timeout: float = 180) -> None:
    r = subprocess.run(["bash", str(SCRIPT), *args], env=node.env, cwd=ROOT, timeout=timeout,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"start-cluster.sh {args[0]}: {r.stdout[-2000:]}{r.stderr[-3000:]}"


def _node_ports(prefix: str) -> list[str]:
    """Ports Ray would otherwise take from fixed defaults, shared with any other Ray here."""
    return [f"--{name}={free_port()}" for name in (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port")] + [
        f"--object-store-memory={STORE}", "--disable-usage-stats", "--num-cpus=1",
        f"--resources={json.dumps({prefix: 1})}"]


def _wait_serving(dep: Deployment, timeout: float = 300) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{dep.grpc_port}")
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert dep.serve.poll() is None, dep.serve_log.read_text()[-3000:]
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"never SERVING: {dep.serve_log.read_text()[-3000:]}")


def _kill_leftovers(nodes: list[Node], serve: subprocess.Popen[bytes] | None) -> None:
    """Whatever a failed test left: only this test's processes, found afresh (a pid seen
    earlier may belong to someone else by now)."""
    if serve is not None and serve.poll() is None:
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait(30)
    for node in nodes:
        for pid in ray_processes_under(node.temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def dep() -> Iterator[Deployment]:
    # Short paths: Ray's unix sockets live under the temp dir (a 107-byte limit).
    root = Path(tempfile.mkdtemp(prefix="pdsc-", dir="/tmp"))
    ray_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    head = Node(root / "h", _env(root / "h", RAY_PORT=str(ray_port),
                                 RAY_METRICS_PORT=str(free_port()),
                                 RAY_DASHBOARD_PORT=str(free_port())))
    worker = Node(root / "w", _env(root / "w", RAY_PORT=str(ray_port),
                                   RAY_METRICS_PORT=str(free_port())))
    serve: subprocess.Popen[bytes] | None = None
    log = root / "serve.log"
    try:
        _run(head, "head", *_node_ports(DECODE_LABEL), f"--ray-client-server-port={free_port()}")
        _run(worker, "worker", "127.0.0.1", *_node_ports(PREFILL_LABEL))
        with log.open("wb") as out:
            serve = subprocess.Popen(
                ["bash", str(SCRIPT), "serve", "--model", MODEL, "--port", str(grpc_port),
                 "--metrics-port", str(metrics_port), "--http-port", "0",
                 "--prefill-workers", "1", "--decode-workers", "1", "--kv-cache-memory", "0.1",
                 "--prefill-resources", json.dumps({PREFILL_LABEL: 1}),
                 "--decode-resources", json.dumps({DECODE_LABEL: 1})],
                env=head.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        d = Deployment(head, worker, grpc_port, metrics_port, serve, log)
        d.track()
        yield d
    finally:
        _kill_leftovers([worker, head], serve)
        shutil.rmtree(root, ignore_errors=True)


def test_greedy_answer_across_the_two_nodes_equals_offline(dep: Deployment) -> None:
    _wait_serving(dep)
    channel = grpc.insecure_channel(f"127.0.0.1:{dep.grpc_port}")
    stub = pb_grpc.GenerationStub(channel)
    auth = (("authorization", f"Bearer {API_KEY}"),)
    got = []
    for prompt in PROMPTS:
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
            temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
        got.append([t for r in stub.Generate(req, timeout=120, metadata=auth)
                    for t in r.token_ids])
    want = [o.token_ids for o in LLM(model=MODEL).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))]
    assert got == want
    assert len({tuple(t) for t in want}) == len(PROMPTS)  # distinct: a mixed-up KV shows

    # Each role on the node started with its label: the KV crossed object stores.
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30, metadata=auth)
    nodes = {w.role: w.node_id for w in info.workers}
    assert len(nodes) == 2 and len(set(nodes.values())) == 2, info.workers
    dep.track()


def test_ray_node_metrics_and_pdserve_in_one_prometheus(dep: Deployment) -> None:
    reason = install_prometheus()
    if reason is not None:
        pytest.skip(reason)
    _wait_serving(dep)
    config = yaml.safe_load((ROOT / "cluster" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    # The shipped file, pointed at this deployment: the router's port, and the discovery
    # file the head's Ray writes (under RAY_TEMP_DIR instead of /tmp/ray).
    jobs["pdserve"]["static_configs"][0]["targets"] = [f"127.0.0.1:{dep.metrics_port}"]
    sd = dep.head.temp_dir / "prom_metrics_service_discovery.json"
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/tmp/ray/" + sd.name]
    jobs["ray"]["file_sd_configs"][0]["files"] = [str(sd)]
    with PrometheusServer(config, dep.head.temp_dir.parent / "prometheus") as prom:
        prom.wait_for('up{job="pdserve"}', lambda r: len(r) == 1 and r[0]["value"][1] == "1")
        # Both nodes' node metrics: one series per node, told apart by IsHeadNode.
        heads = prom.wait_for(
            'count by (IsHeadNode) (ray_node_mem_used{job="ray"})', lambda r: len(r) == 2,
            timeout=90)
        assert {s["metric"]["IsHeadNode"] for s in heads} == {"true", "false"}
        up = prom.vector('up{job="ray"}')
        assert sum(1 for s in up if s["value"][1] == "1") >= 2, up
        assert prom.vector('pdserve_worker_up{job="pdserve"}'), "pdserve's own series missing"
        # Every Ray series the dashboard's "Ray nodes" row reads (the GPU ones aside: no GPU
        # here) arrives under the name it uses.
        names = {n for e in dashboard_exprs() for n in re.findall(r"\bray_[a-z0-9_]+", e)}
        assert "ray_node_mem_used" in names
        for name in sorted(names - {"ray_node_gpus_utilization", "ray_node_gram_used"}):
            prom.wait_for(f'{name}{{job="ray"}}', lambda r: len(r) > 0, timeout=60)


def test_stop_leaves_nothing_running(dep: Deployment) -> None:
    pids = dep.track()
    assert len(pids) >= 6, pids  # GCS, raylets, agents, dashboard, both workers' actors
    for node in dep.nodes():
        _run(node, "stop", timeout=240)
    # pdserve drained and exited on SIGTERM (0), and no process of either node is left.
    assert dep.serve.wait(10) == 0, dep.serve_log.read_text()[-3000:]
    alive = {p for p in pids if Path(f"/proc/{p}").exists()
             and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"}
    assert not alive, alive
    for node in dep.nodes():
        assert not ray_processes_under(node.temp_dir)
    assert not (dep.head.temp_dir / "pdserve.pid").exists()
