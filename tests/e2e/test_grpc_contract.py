"""The contracts around the server that need no running service: committed stubs match
the .proto, `pdserve serve` flags and config files, and the cluster launch files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import ConfigError
from router.cli import parser
from router.config import RouterConfig
from router.settings import settings_from_args

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "pdserve" / "v1" / "generation.proto"
CLUSTER = ROOT / "cluster"

# Scripts depend on these names (issue: "their names are part of the contract").
SERVE_FLAGS = {
    "--model": "dummy:llama-3-8b", "--mode": "colocated", "--prefill-workers": "3",
    "--decode-workers": "4", "--workers": "5", "--gpus-per-worker": "0.5",
    "--threads-per-worker": "2", "--kv-transfer": "cuda-ipc", "--host": "0.0.0.0",
    "--port": "6000", "--metrics-port": "6001", "--ray-address": "auto",
    "--api-key": "k", "--prefill-policy": "fcfs", "--prefill-step-tokens": "128",
}


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools compiles the .proto")
    from google.protobuf import descriptor_pb2

    from proto.pdserve.v1 import generation_pb2

    out = tmp_path / "set.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}",
                    f"--descriptor_set_out={out}", str(PROTO)], check=True)
    [fresh] = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    for message in fresh.message_type:  # newer protoc records json names; stubs need not
        for f in message.field:
            f.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(
        generation_pb2.DESCRIPTOR.serialized_pb)
    assert fresh == committed, "run proto/generate.sh (make proto) after editing the .proto"


def test_serve_flags_reach_the_configs() -> None:
    argv = ["serve"] + [x for kv in SERVE_FLAGS.items() for x in kv]
    s = settings_from_args(parser().parse_args(argv))
    r = s.router
    assert (r.engine.model, r.mode, r.prefill_workers, r.decode_workers, r.workers) == (
        "dummy:llama-3-8b", "colocated", 3, 4, 5)
    assert (r.gpus_per_worker, r.threads_per_worker, r.kv_transfer, r.ray_address) == (
        0.5, 2, "cuda-ipc", "auto")
    assert (s.server.host, s.server.port, s.server.metrics_port, s.server.api_key) == (
        "0.0.0.0", 6000, 6001, "k")
    assert (r.prefill_policy, r.prefill_step_tokens) == ("fcfs", 128)
    assert r.engine.cache.enable_prefix_caching  # on unless --no-prefix-cache


def test_prefill_worker_engine_and_no_prefix_cache_flag() -> None:
    s = settings_from_args(parser().parse_args(
        ["serve", "--no-prefix-cache", "--prefill-step-tokens", "96",
         "--max-num-batched-tokens", "300", "--max-num-seqs", "7"]))
    r = s.router
    assert not r.engine.cache.enable_prefix_caching
    assert (r.engine.scheduler.max_num_batched_tokens, r.engine.scheduler.max_num_seqs) == (
        300, 7)
    prefill, decode = r.worker_engine("prefill"), r.worker_engine("decode")
    assert (prefill.scheduler.policy, prefill.scheduler.max_num_batched_tokens) == (
        "shortest_first", 96)
    assert (decode.scheduler.policy, decode.scheduler.max_num_batched_tokens) == (
        "fcfs", r.engine.scheduler.max_num_batched_tokens)
    assert not prefill.cache.enable_prefix_caching and not decode.cache.enable_prefix_caching
    with pytest.raises(ConfigError, match="prefill_policy"):
        RouterConfig(prefill_policy="lifo")
    with pytest.raises(ConfigError, match="prefill_step_tokens"):
        RouterConfig(prefill_step_tokens=0)


def test_tls_flags_and_config_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("y")
    toml = tmp_path / "pdserve.toml"
    toml.write_text('mode = "colocated"\nworkers = 3\nmodel = "dummy:llama-3-8b"\n'
                    "[engine.cache]\nmemory_bytes = 1048576\n"
                    "[server]\nport = 7000\napi_key = \"from-file\"\n")
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    s = settings_from_args(parser().parse_args(
        ["serve", "--config", str(toml), "--workers", "4", "--tls-cert", str(cert),
         "--tls-key", str(key)]))
    assert (s.router.mode, s.router.workers, s.router.engine.model) == (
        "colocated", 4, "dummy:llama-3-8b")  # the flag beats the file
    assert s.router.engine.cache.memory_bytes == 1 << 20
    assert (s.server.port, s.server.api_key, s.server.tls) == (7000, "from-file", True)

    monkeypatch.setenv("PDSERVE_API_KEY", "from-env")
    s = settings_from_args(parser().parse_args(["serve", "--config", str(toml)]))
    assert s.server.api_key == "from-env"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"prefill_wrokers": 2}))
    with pytest.raises(ConfigError, match="prefill_wrokers"):
        settings_from_args(parser().parse_args(["serve", "--config", str(bad)]))
    with pytest.raises(ConfigError, match="tls_cert and tls_key"):
        settings_from_args(parser().parse_args(["serve", "--tls-cert", str(cert)]))


def test_cli_reports_bad_settings_without_a_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    from router.cli import main

    assert main(["serve", "--prefill-workers", "0"]) == 2
    assert "prefill_workers" in capsys.readouterr().err


def test_prometheus_config_is_valid() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    r = subprocess.run(["promtool", "check", "config", str(CLUSTER / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ray_cluster_yaml_matches_rays_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json")
                        .read_text())
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["head"]["resources"]["GPU"] == 0


def test_kuberay_manifest_serves_pdserve() -> None:
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-raycluster.yaml").read_text()))
    [m] = [d for d in docs if d["kind"] == "RayCluster"]
    assert m["apiVersion"] == "ray.io/v1"
    [head] = m["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    command = " ".join(head["args"])
    assert "pdserve serve --ray-address auto" in command
    # The server runs TLS: the probe asks the HTTPS /ready (tests/unit/test_cluster_files.py
    # checks the rest of the manifest against KubeRay's CRD).
    assert head["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8000,
                                                 "scheme": "HTTPS"}
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert (ports["grpc"], ports["pdserve-metrics"]) == (50051, 9464)
    gpus = m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" in gpus["resources"]["limits"]


def test_start_cluster_script() -> None:
    script = CLUSTER / "start-cluster.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "start-cluster.sh serve [PDSERVE_FLAGS...]" in usage.stdout


@pytest.mark.slow
def test_serve_demo_exit_streams_an_answer() -> None:
    """The README's main command, as a user runs it (its own Ray, workers and ports)."""
    r = subprocess.run([sys.executable, "-m", "router.cli", "serve", "--port", "0",
                        "--metrics-port", "0", "--http-port", "0", "--demo-exit"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pdserve is serving pdserve.v1.Generation on 127.0.0.1:" in r.stdout
    assert "Paris" in r.stdout.split("demo>", 1)[1]
