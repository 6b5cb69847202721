"""SIGTERM as an orchestrator sends it: `pdserve serve` in its own process, a stream
running, the signal. Health must turn NOT_SERVING at once, a new call must be refused
with UNAVAILABLE, and the running stream -- cut off when the grace period ends -- must
get a last message with FINISH_REASON_ABORT before its call ends OK."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.pdserve.v1 import generation_pb2 as pb
from proto.pdserve.v1 import generation_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_sigterm_refuses_new_calls_and_ends_streams_with_abort() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--port", str(port),
         "--metrics-port", "0", "--http-port", "0", "--shutdown-grace-s", "3"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = pb_grpc.GenerationStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        for _ in range(600):  # the workers load: minutes on a busy 2-core machine
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == serving:
                    break
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the server never became SERVING")

        long = pb.GenerateRequest(prompt="Tell me a very long story.", sampling=pb.SamplingParams(
            temperature=0.0, max_tokens=4000, ignore_eos=True))
        messages: list[pb.GenerateResponse] = []
        errors: list[grpc.RpcError] = []
        first = threading.Event()

        def consume() -> None:
            try:
                for r in stub.Generate(long, timeout=300):
                    messages.append(r)
                    first.set()
            except grpc.RpcError as e:
                errors.append(e)
                first.set()

        t = threading.Thread(target=consume)
        t.start()
        assert first.wait(300) and not errors, errors
        os.kill(proc.pid, signal.SIGTERM)
        for _ in range(100):  # NOT_SERVING at once (well before the 3 s grace ends)
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            except grpc.RpcError:
                status = None
            if status != serving:
                break
            time.sleep(0.02)
        assert status != serving
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=30))
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE,)  # type: ignore[attr-defined]
        t.join(120)
        assert not errors, errors
        assert messages[-1].finish_reason == pb.FINISH_REASON_ABORT
        assert 0 < messages[-1].usage.completion_tokens < 4000
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def test_sigterm_while_workers_load_stops_the_start() -> None:
    """The signal during startup (workers still loading -- or a role no node can host,
    which may never end) cancels the start: the service never announces itself and the
    process exits 0, instead of holding the signal until the workers are up."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--port", str(port),
         "--metrics-port", "0", "--http-port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        for _ in range(600):  # the port answers first; the workers load after it
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                break
            except grpc.RpcError:
                time.sleep(0.2)
        else:
            raise AssertionError("the server's port never answered")
        assert status != health_pb2.HealthCheckResponse.SERVING, "workers loaded already"
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
        assert "pdserve is serving" not in out, out
        assert "stopped by a signal before the service was up" in out, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _session(sid: int) -> set[int]:
    """Every live process of session ``sid`` (Ray's GCS, raylet, agents and workers stay
    in the session of the `pdserve serve` that started them)."""
    alive = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":  # zombies hold nothing
                alive.add(int(entry))
    return alive


def test_sigterm_at_any_instant_of_the_start_exits_0_leaving_no_process() -> None:
    """While Ray itself starts (GCS, raylet, agents), too: Ray's own handlers would abort
    the process or exit midway, orphaning what had started. Random instants of the
    first seconds, where Ray starts; the workers' load is the test above."""
    rng = random.Random()
    for delay in sorted(rng.uniform(0.2, 5.0) for _ in range(3)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "serve", "--port", str(_free_port()),
             "--metrics-port", "0", "--http-port", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
        try:
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGTERM)
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, (delay, out[-3000:])
            assert "stopped by a signal before the service was up" in out, (delay, out)
            for _ in range(300):  # children exit within a few seconds of the driver
                if not _session(proc.pid):
                    break
                time.sleep(0.1)
            assert not _session(proc.pid), (delay, _session(proc.pid))
        finally:
            if proc.poll() is None or _session(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
