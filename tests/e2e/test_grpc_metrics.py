"""Metrics end to end: a real Prometheus scrapes the router on loopback; promtool lints
the exposition; every query of the Grafana dashboard runs against it."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from proto.pdserve.v1 import generation_pb2 as pb
from tests.e2e.grpc_dashboard import dashboard_exprs, for_prometheus

if TYPE_CHECKING:
    from tests.e2e.grpc_fixtures import LiveService

pytest_plugins = ["tests.e2e.grpc_fixtures"]


def _install_prometheus() -> str | None:
    """The Debian package, installed here if missing (CI's .ci/run installs it up front);
    the reason it cannot be had, or None."""
    if shutil.which("prometheus") and shutil.which("promtool"):
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return "prometheus is not installed and apt-get (as root) is not available"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {r.stderr.strip()[-300:]}"
    return None if shutil.which("prometheus") else "the prometheus package has no binary"


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.proc = proc

    def query(self, expr: str) -> dict[str, Any]:
        q = urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:  # 400 for a bad expression: report its error
            return json.load(e)

    def vector(self, expr: str) -> list[dict[str, Any]]:
        body = self.query(expr)
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def wait_for(self, expr: str, ok: Any, timeout: float = 45.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.vector(expr)
            if ok(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr}: no satisfying data after {timeout} s: {result}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(live: LiveService, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[Prometheus]:
    reason = _install_prometheus()
    if reason is not None:
        pytest.skip(reason)
    from tests.e2e.grpc_fixtures import free_port

    d: Path = tmp_path_factory.mktemp("prometheus")
    target = live.metrics_url.removeprefix("http://").removesuffix("/metrics")
    (d / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: pdserve\n    static_configs: [{{targets: ['{target}']}}]\n")
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={d / 'prometheus.yml'}",
         f"--storage.tsdb.path={d / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("prometheus did not become ready")
        time.sleep(0.2)
    yield Prometheus(url, proc)
    proc.terminate()
    proc.wait(timeout=30)


def _number(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


def test_prometheus_sees_ttft_histogram_and_kv_usage(live: LiveService,
                                                      prometheus: Prometheus) -> None:
    prometheus.wait_for('up{job="pdserve"}', lambda r: r and _number(r[0]) == 1.0)
    for i in range(3):
        live.generate(pb.GenerateRequest(prompt=f"Tell me a fact about the number {i}.",
                                         sampling=pb.SamplingParams(max_tokens=8)))
    prometheus.wait_for("pdserve_time_to_first_token_seconds_count",
                        lambda r: r and _number(r[0]) >= 3)
    buckets = prometheus.vector("count(pdserve_time_to_first_token_seconds_bucket)")
    assert _number(buckets[0]) > 10  # every bucket boundary is a series
    p50 = prometheus.wait_for(
        "histogram_quantile(0.5, sum by (le) "
        "(rate(pdserve_time_to_first_token_seconds_bucket[30s])))",
        lambda r: r and not math.isnan(_number(r[0])))
    assert 0 < _number(p50[0]) < 60
    usage = prometheus.wait_for("pdserve_kv_cache_usage_ratio", lambda r: len(r) >= 2)
    assert {s["metric"]["role"] for s in usage} >= {"prefill", "decode"}
    assert all(0.0 <= _number(s) <= 1.0 for s in usage)
    prometheus.wait_for("pdserve_inter_token_latency_seconds_count",
                        lambda r: r and _number(r[0]) > 0)
    prometheus.wait_for('sum(pdserve_worker_up{role="decode"})',
                        lambda r: r and _number(r[0]) >= 1)


def test_promtool_accepts_the_scrape(live: LiveService) -> None:
    if _install_prometheus() is not None or shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not available")
    with urllib.request.urlopen(live.metrics_url, timeout=10) as r:
        text = r.read()
    assert b"pdserve_time_to_first_token_seconds_bucket" in text
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_dashboard_queries_name_exported_series(live: LiveService) -> None:
    with urllib.request.urlopen(live.metrics_url, timeout=10) as r:
        exported = {m.group(1) for m in
                    re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", r.read().decode(), re.M)}
    exprs = dashboard_exprs()
    named = {n for e in exprs for n in re.findall(r"\bpdserve_[a-z0-9_]+", e)}
    missing = sorted(named - exported)
    assert not missing, f"the dashboard queries series the server does not export: {missing}"
    # The panels the operations guide promises.
    for needed in ("pdserve_time_to_first_token_seconds_bucket",
                   "pdserve_inter_token_latency_seconds_bucket",
                   "pdserve_generation_tokens_total", "pdserve_num_requests_queued",
                   "pdserve_kv_cache_usage_ratio", "pdserve_kv_transfer_seconds_bucket",
                   "pdserve_kv_transfer_bytes_total", "pdserve_worker_up"):
        assert needed in named, needed


def test_dashboard_queries_run_in_prometheus(prometheus: Prometheus) -> None:
    for expr in dashboard_exprs():
        body = prometheus.query(for_prometheus(expr))
        assert body["status"] == "success", (expr, body.get("error"))
