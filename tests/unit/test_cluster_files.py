"""The launch files in cluster/ against the schemas their tools use, and against the
points that make them work rather than merely validate: workers that run `ray start`,
probes that speak the server's TLS mode, a head Service workers reach before the head is
Ready, secrets that exist where commands read them, one pinned Ray everywhere, Ray's
metrics served, and a model volume many nodes can mount.

Ray's cluster-config schema is the one the installed ray ships; KubeRay's RayCluster CRD
schema is vendored in tests/data (its version and source are in the file's header)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1].parent
CLUSTER = ROOT / "cluster"
CRD_SCHEMA = ROOT / "tests" / "data" / "kuberay-raycluster-crd-v1.7.0.schema.yaml"
OVERWRITE = "ray.io/overwrite-container-cmd"


def _ray_dir() -> Path:
    spec = importlib.util.find_spec("ray")  # without importing ray (seconds)
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent


def _ray_cluster() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())


def _kuberay() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay-raycluster.yaml").read_text()) if d]
    rc = [d for d in docs if d["kind"] == "RayCluster"]
    assert len(rc) == 1
    return rc[0], [d for d in docs if d["kind"] != "RayCluster"]


def _header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines)


def _strict(schema: Any) -> Any:
    """Unknown fields rejected, as the API server's strict field validation (kubectl's
    default) does; a CRD schema alone only prunes them."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _errors(doc: Any, schema: dict[str, Any]) -> list[str]:
    cls = jsonschema.validators.validator_for(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in cls(schema).iter_errors(doc)]


# -- ray-cluster.yaml (`ray up`) --------------------------------------------------------

def test_ray_cluster_yaml_matches_the_schema_ray_ships() -> None:
    schema = json.loads((_ray_dir() / "autoscaler" / "ray-schema.json").read_text())
    assert _errors(_ray_cluster(), schema) == []
    assert _errors({"cluster_name": "x", "provider": {"type": "aws"}, "max_worker": 1},
                   schema), "the schema must reject an unknown key"


def _pinned_ray(text: str) -> str:
    pins = set(re.findall(r"ray\[default\]==([0-9.]+)", text))
    assert len(pins) == 1, pins
    return pins.pop()


def test_ray_cluster_pins_one_ray_with_metrics_and_starts_it_everywhere() -> None:
    cfg = _ray_cluster()
    version = _pinned_ray(" ".join(cfg["setup_commands"]))
    assert version == _kuberay()[0]["spec"]["rayVersion"]
    assert f"ray[default]=={version}" in _header(CLUSTER / "ray-cluster.yaml")
    head, worker = (" ".join(cfg[k]) for k in ("head_start_ray_commands",
                                               "worker_start_ray_commands"))
    for cmd in (head, worker):
        assert "--metrics-export-port=8080" in cmd
        # Ray from the venv that has it pinned, never whatever `ray` the image has.
        assert set(re.findall(r"(\S*)ray (?:start|stop)", cmd)) == {"~/pdserve-venv/bin/"}
    assert "--include-dashboard=true" in head and "--dashboard-host=127.0.0.1" in head
    assert "--include-dashboard=false" not in head + worker


def test_ray_cluster_uploads_the_project_without_venv_caches_or_models() -> None:
    cfg = _ray_cluster()
    assert ".gitignore" in cfg["rsync_filter"]
    ignored = (ROOT / ".gitignore").read_text().split()
    for pattern in (".venv/", "__pycache__/", "*.gguf", "*.safetensors"):
        assert pattern in ignored
    excluded = set(cfg["rsync_exclude"])
    assert {"**/.venv", "**/.git", "**/__pycache__", "*.gguf", "*.safetensors"} <= excluded


def _exec_command(header: str) -> str:
    """The single-quoted command of the header's `ray exec`, as your shell passes it."""
    m = re.search(r"ray exec \S+ (?:--tmux )?\\?\s*('(?:[^']*)')", header)
    assert m, header
    return shlex.split(m.group(1).replace("\\\n", " "))[0]


def test_ray_exec_command_reads_the_key_and_tls_files_on_the_head(tmp_path: Path) -> None:
    """Runs the header's command in a shell as the head would, with HOME holding what
    file_mounts put there and a pdserve that prints what it got."""
    cfg = _ray_cluster()
    header = _header(CLUSTER / "ray-cluster.yaml")
    command = _exec_command(header)
    home = Path(f"/home/{cfg['auth']['ssh_user']}")
    mounts = {Path(k): v for k, v in cfg["file_mounts"].items()}
    secrets = home / "pdserve-secrets"
    assert mounts.get(secrets) == "~/pdserve-secrets"
    fake_home = tmp_path / "home"
    (fake_home / "pdserve-secrets").mkdir(parents=True)
    for name in ("api-key", "cert.pem", "key.pem"):
        (fake_home / "pdserve-secrets" / name).write_text(f"{name}-content\n")
    pdserve = fake_home / "pdserve-venv" / "bin" / "pdserve"
    pdserve.parent.mkdir(parents=True)
    pdserve.write_text('#!/bin/sh\necho "KEY=$PDSERVE_API_KEY"\nfor a; do echo "ARG=$a"; done\n')
    pdserve.chmod(0o755)
    # No PDSERVE_API_KEY on the head; pdserve found by path or on PATH.
    env = {"HOME": str(fake_home), "PATH": f"{pdserve.parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert "KEY=api-key-content" in out
    args = [line[4:] for line in out if line.startswith("ARG=")]
    for flag in ("--tls-cert", "--tls-key"):
        path = Path(args[args.index(flag) + 1])
        assert path.is_file() and path.is_relative_to(fake_home / "pdserve-secrets")
    assert "--api-key" not in args  # a key on the command line would show in `ps`
    info = header[header.index("pdserve info"):]
    assert "--tls-ca" in info and "--api-key" in info


# -- kuberay-raycluster.yaml --------------------------------------------------------------

def _crd_schema() -> dict[str, Any]:
    body = "\n".join(line for line in CRD_SCHEMA.read_text().splitlines()
                     if not line.startswith("#"))
    return json.loads(body)  # JSON is YAML; json is far faster on 160 kB


def test_kuberay_manifest_matches_the_raycluster_crd_strictly() -> None:
    schema = _strict(_crd_schema())
    rc, _ = _kuberay()
    assert _errors(rc, schema) == []
    broken = json.loads(json.dumps(rc))
    broken["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 4
    broken["spec"]["headGroupSpec"]["servicetype"] = "ClusterIP"
    errs = _errors(broken, schema)
    assert any("rayStartParams" in e for e in errs) and any("servicetype" in e for e in errs)


def _head_container(rc: dict[str, Any]) -> dict[str, Any]:
    return rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _head_command(rc: dict[str, Any]) -> list[str]:
    c = _head_container(rc)
    return shlex.split(" ".join(c.get("command", []) + c.get("args", [])))


def _flag(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def test_every_worker_group_runs_ray_start() -> None:
    rc, _ = _kuberay()
    # KubeRay copies the RayCluster's annotations to every pod: there it would stop the
    # workers' generated `ray start` as well as the head's.
    assert OVERWRITE not in (rc["metadata"].get("annotations") or {})
    for group in rc["spec"]["workerGroupSpecs"]:
        tmpl = group["template"]
        assert OVERWRITE not in (tmpl.get("metadata", {}).get("annotations") or {})
        c = tmpl["spec"]["containers"][0]
        own = " ".join(c.get("command", []) + c.get("args", []))
        # KubeRay generates `ray start` unless the container's command already has one.
        assert own == "" or "ray start" in own
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    head = rc["spec"]["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())
    if (head["template"].get("metadata", {}).get("annotations") or {}).get(OVERWRITE) == "true":
        words = _head_command(rc)
        assert "ray start" in " ".join(words) and "--head" in words


def test_head_probes_speak_the_servers_tls_mode() -> None:
    rc, _ = _kuberay()
    words, c = _head_command(rc), _head_container(rc)
    tls = _flag(words, "--tls-cert") is not None
    http_port = int(_flag(words, "--http-port") or 8000)
    for probe in ("readinessProbe", "startupProbe"):
        p = c[probe]
        if tls:
            # A kubelet gRPC probe is plaintext only: against TLS it never passes.
            assert "grpc" not in p, probe
            assert p["httpGet"]["scheme"] == "HTTPS" and p["httpGet"]["port"] == http_port
            assert p["httpGet"]["path"] in ("/ready", "/health")
        else:
            assert "grpc" in p or p["httpGet"].get("scheme", "HTTP") == "HTTP"


def test_port_names_and_tls_files_and_header_info() -> None:
    rc, _ = _kuberay()
    words, c = _head_command(rc), _head_container(rc)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    exports = [w.split("=", 1)[1] for w in words if w.startswith("--metrics-export-port=")]
    assert len(exports) == 1
    ray_metrics = int(exports[0])
    # KubeRay reserves the name `metrics` for Ray's own exporter.
    assert ports.get("metrics") == ray_metrics
    assert ports["pdserve-metrics"] == int(_flag(words, "--metrics-port") or 9464)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    for flag in ("--tls-cert", "--tls-key"):
        path = _flag(words, flag)
        assert path is not None and mounts.get(str(Path(path).parent)) == "tls", flag
    info = _header(CLUSTER / "kuberay-raycluster.yaml")
    info = info[info.index("pdserve info"):].split("\n#", 1)[0]
    assert "--tls-ca" in info and "--api-key" in info


def test_head_service_reachable_before_ready_and_clients_get_a_ready_head() -> None:
    rc, others = _kuberay()
    svc = rc["spec"]["headGroupSpec"].get("headService", {}).get("spec", {})
    assert svc.get("publishNotReadyAddresses") is True
    clients = [d for d in others if d["kind"] == "Service"]
    assert len(clients) == 1
    spec = clients[0]["spec"]
    assert "publishNotReadyAddresses" not in spec  # clients only reach a Ready head
    assert spec["selector"] == {"ray.io/cluster": rc["metadata"]["name"],
                                "ray.io/node-type": "head"}
    names = {p["name"] for p in _head_container(rc)["ports"]}
    assert {p["targetPort"] for p in spec["ports"]} <= names


def test_model_volume_is_many_reader_and_mounted_read_only() -> None:
    rc, others = _kuberay()
    claims = {d["metadata"]["name"]: d for d in others if d["kind"] == "PersistentVolumeClaim"}
    templates = [rc["spec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in rc["spec"]["workerGroupSpecs"]]
    used = 0
    for t in templates:
        vols = {v["name"]: v for v in t["spec"]["volumes"]}
        for m in t["spec"]["containers"][0]["volumeMounts"]:
            pvc = vols[m["name"]].get("persistentVolumeClaim")
            if pvc is None:
                continue
            used += 1
            modes = set(claims[pvc["claimName"]]["spec"]["accessModes"])
            assert modes & {"ReadOnlyMany", "ReadWriteMany"}, modes
            assert m.get("readOnly") is True
    assert used == len(templates)


# -- start-cluster.sh and prometheus.yml ---------------------------------------------------

def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (`make prometheus` installs it, as root)")
    return path


def test_start_cluster_passes_shellcheck() -> None:
    r = subprocess.run([_tool("shellcheck"), str(CLUSTER / "start-cluster.sh")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_prometheus_yml_passes_promtool_and_reads_rays_discovery_file() -> None:
    r = subprocess.run([_tool("promtool"), "check", "config", str(CLUSTER / "prometheus.yml")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = {j["job_name"]: j for j in
            yaml.safe_load((CLUSTER / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"][0]["files"] == [
        "/tmp/ray/prom_metrics_service_discovery.json"]
