"""A real Prometheus on loopback for a test, from a scrape configuration given as a
dict (a shipped file adapted to the test's ports); the Debian binary, as
tests/e2e/test_grpc_metrics.py uses it."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from tests.e2e.grpc_fixtures import free_port
from tests.e2e.test_grpc_metrics import Prometheus
from tests.e2e.test_grpc_metrics import _install_prometheus as install_prometheus

__all__ = ["PrometheusServer", "install_prometheus"]


class PrometheusServer:
    def __init__(self, config: dict[str, Any], work_dir: Path) -> None:
        self.config = config
        self.dir = work_dir
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(self.config))
        url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address={url.removeprefix('http://')}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return Prometheus(url, self.proc)
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("prometheus did not become ready")
            time.sleep(0.2)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
