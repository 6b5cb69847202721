"""A `pdserve serve` subprocess for one benchmark deployment.

Each deployment runs in its own process with its own Ray (started by the server, in
its own session so that everything it spawned can be stopped together), one at a
time, on free ports. Stopping sends SIGINT (the server's clean shutdown: workers go,
ray.shutdown()); only if that hangs is the process group this bench started killed.
Never `ray stop`: other Ray instances on the machine are not ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Deployment:
    """One server shape. Same resources on both sides of a comparison: a colocated
    deployment of ``workers`` N against a disaggregated one of P + D = N workers, each
    with ``threads`` torch threads (and Ray CPUs)."""

    name: str
    mode: str = "disaggregated"
    prefill_workers: int = 1
    decode_workers: int = 1
    workers: int = 2
    threads: int = 1
    prefix_cache: bool = True
    model: str | None = None
    gpus_per_worker: float = 0.0  # > 0: GPU workers (fractions share a GPU; cuda-ipc)
    prefill_step_tokens: int | None = None  # None: the server's default
    step_tokens: int | None = None  # every worker's step budget; None: the engine's
    kv_transfer: str | None = None  # None: auto
    stream_interval: int = 1  # tokens per streamed message after the first

    def args(self) -> list[str]:
        a = ["--mode", self.mode, "--threads-per-worker", str(self.threads)]
        if self.mode == "colocated":
            a += ["--workers", str(self.workers)]
        else:
            a += ["--prefill-workers", str(self.prefill_workers),
                  "--decode-workers", str(self.decode_workers)]
            if self.prefill_step_tokens is not None:
                a += ["--prefill-step-tokens", str(self.prefill_step_tokens)]
        if self.model:
            a += ["--model", self.model]
        if self.gpus_per_worker:
            a += ["--gpus-per-worker", str(self.gpus_per_worker)]
        if self.kv_transfer:
            a += ["--kv-transfer", self.kv_transfer]
        if self.step_tokens is not None:
            a += ["--max-num-batched-tokens", str(self.step_tokens)]
        if not self.prefix_cache:
            a.append("--no-prefix-cache")
        if self.stream_interval != 1:
            a += ["--stream-interval", str(self.stream_interval)]
        return a


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``with ServerProcess(dep, log_dir) as target:`` runs the server for the block."""

    def __init__(self, dep: Deployment, log_dir: Path) -> None:
        self.dep = dep
        self.log_path = log_dir / f"server-{dep.name}.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        # --http-port 0 first: the OpenAI API stays off (not on 8000, which may be
        # taken) unless the deployment's own args turn it on; the last flag wins.
        cmd = [sys.executable, "-m", "router.cli", "serve", "--http-port", "0",
               *self.dep.args(),
               "--port", str(self.port), "--metrics-port", str(free_port())]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # OMP_NUM_THREADS=1: the router process itself must not spin torch threads
        # against the workers; workers set their own count (threads_per_worker).
        env = dict(os.environ, OMP_NUM_THREADS="1", RAY_DEDUP_LOGS="0",
                   PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        log.close()
        sys.stderr.write(f"[bench] started {self.dep.name}: {' '.join(cmd[3:])} "
                         f"(log: {self.log_path})\n")
        return self.target

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout_s: float = 60.0) -> None:
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                sys.stderr.write(f"[bench] {self.dep.name} did not stop; killing its group\n")
        # Whatever the server spawned (Ray's gcs, raylet, workers) is in the session this
        # bench created for it; clean up leftovers of a server that died or hung.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(10)
        self.proc = None
        time.sleep(1.0)  # let the ports and the memory go before the next deployment
