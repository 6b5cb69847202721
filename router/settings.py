"""`pdserve serve` settings: flags derived from RouterConfig / ServerConfig, a config
file, and the environment, merged into the two frozen configs.

Precedence, lowest first: the dataclasses' defaults < the --config file < the
PDSERVE_API_KEY environment variable (api_key only) < flags given on the command line.

The config file (JSON, or TOML when it ends in .toml) mirrors the dataclasses::

    mode = "disaggregated"          # RouterConfig fields at the top level
    prefill_workers = 2
    model = "smollm2-135m"          # shorthand for engine.model
    [engine.cache]                  # EngineConfig, nested as in engine/config.py
    memory_bytes = 1073741824
    [server]                        # ServerConfig
    port = 50051
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
import typing
from typing import Any, NamedTuple

from engine.config import KV_CACHE_DTYPES, SCHEDULER_POLICIES, ConfigError, EngineConfig
from router.config import RouterConfig
from router.node_resources import parse_resources
from router.server_config import API_KEY_ENV, ServerConfig
from runtime.config import KV_BACKENDS

# Flags of `pdserve serve` (their names are a contract: scripts depend on them), each the
# field of the same name with dashes. --model is engine.model.
ROUTER_FLAGS: dict[str, str] = {
    "mode": "disaggregated: prefill and decode workers; colocated: workers that do both",
    "prefill_workers": "prefill workers (disaggregated mode)",
    "decode_workers": "decode workers (disaggregated mode)",
    "workers": "workers that prefill and decode (colocated mode)",
    "gpus_per_worker": "GPUs per worker, 0 on CPU; a fraction (0.5) lets prefill and decode "
                       "share a GPU",
    "threads_per_worker": "torch threads (and Ray CPUs) per worker on CPU",
    "kv_transfer": "how KV caches move: auto picks per pair -- cuda-ipc with a fraction of "
                   "a GPU per worker, collective (NCCL) with whole GPUs, on CPU the object "
                   "store within a Ray node and collective (gloo) across nodes",
    "prefill_policy": "prefill workers' scheduling: shortest_first lets short prompts past "
                      "a long prompt's chunks; fcfs serves in arrival order",
    "prefill_step_tokens": "prefill workers' token budget per step (default: the engine's "
                           "max_num_batched_tokens); smaller starts short prompts sooner",
    "stream_interval": "tokens per streamed message after the first (1: every token at "
                       "once; N: one message per N tokens, ~1/N of the router's "
                       "per-message CPU)",
    "max_inflight": "requests in flight at once for the whole deployment; beyond it calls "
                    "get RESOURCE_EXHAUSTED at once, with a retry hint",
    "max_inflight_per_worker": "the same bound per decode (or colocated) worker",
    "request_timeout_s": "how long a request may take when the client sets no deadline",
    "worker_wait_s": "how long a request waits for a worker of a role while none is alive "
                     "(one is being replaced), before UNAVAILABLE",
    "max_prompt_bytes": "largest prompt accepted, in bytes of text (INVALID_ARGUMENT beyond)",
    "ray_address": "join an existing Ray cluster (e.g. 10.0.0.1:6379 or auto) instead of "
                   "starting Ray in this process",
    "prefill_resources": "custom Ray resources each prefill worker asks for, as a JSON "
                         "object ('{\"prefill_node\": 1}'): places prefill workers on "
                         "nodes started with `ray start --resources` offering them",
    "decode_resources": "the same for decode workers",
    "colocated_resources": "the same for colocated workers",
}
SERVER_FLAGS: dict[str, str] = {
    "host": "address to listen on (gRPC, HTTP and metrics)",
    "port": "gRPC port (0: any free port)",
    "http_port": "OpenAI-compatible HTTP API port (0: off)",
    "metrics_port": "Prometheus metrics port (0: any free port)",
    "api_key": f"require 'authorization: Bearer KEY' on every call (or set {API_KEY_ENV})",
    "tls_cert": "PEM certificate chain; serve TLS (with --tls-key)",
    "tls_key": "PEM private key of --tls-cert",
    "shutdown_grace_s": "on SIGTERM, running streams get this long to finish before they "
                        "end with FINISH_REASON_ABORT",
}
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("disaggregated", "colocated"),
    "kv_transfer": ("auto", *KV_BACKENDS),
    "prefill_policy": SCHEDULER_POLICIES,
}


class Settings(NamedTuple):
    router: RouterConfig
    server: ServerConfig


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    """Flags default to None so that only the ones given override the config file."""
    engine_default = EngineConfig().model
    p.add_argument("--model", default=None,
                   help=f"model name or path: a .gguf file, a Hugging Face directory, or "
                        f"dummy:<preset> (default: {engine_default}, embedded)")
    for cls, flags in ((RouterConfig, ROUTER_FLAGS), (ServerConfig, SERVER_FLAGS)):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for name, help_text in flags.items():
            default = _default(fields[name])
            kind = _scalar_type(hints[name])
            metavar = {int: "N", float: "F"}.get(kind, name.split("_")[-1].upper())
            if name.startswith("tls_"):
                metavar = "PEM"
            if name.endswith("_resources"):
                metavar = "JSON"
            p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, type=kind,
                           choices=CHOICES.get(name),
                           metavar=None if name in CHOICES else metavar,
                           help=help_text + (f" (default: {default})" if default is not None
                                             else ""))
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="token budget of one engine step on every worker (engine.scheduler."
                        "max_num_batched_tokens; default: 512)")
    p.add_argument("--max-num-seqs", type=int, default=None, metavar="N",
                   help="most requests a worker runs at once (engine.scheduler."
                        "max_num_seqs; default: 64)")
    p.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                   help="what every worker's KV cache stores (engine.cache.kv_cache_dtype): "
                        "auto = the model dtype; int8 (CPU, GPU) or fp8 (GPUs with fp8) "
                        "quantize it with per-token scales: 3.76x the blocks per GiB of "
                        "fp32 (CPU), 1.88x of bf16 (GPU), at head_dim 64 (default: auto)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   default=None,
                   help="turn the prefix cache off on every worker (engine.cache."
                        "enable_prefix_caching = false; default: on)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   default=None,
                   help="run every decode step eagerly on GPUs instead of replaying CUDA "
                        "graphs (engine.cuda_graphs = false; default: graphs on)")
    p.add_argument("--kv-cache-memory", type=float, default=None, metavar="GiB",
                   help="KV pool of each worker, in GiB (engine.cache.memory_bytes; "
                        "default: on CPU a share of the host's available memory, on GPUs "
                        "--gpu-memory-utilization)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F",
                   help="fraction of each worker's share of its GPU that weights, "
                        "activations and the KV pool may use (engine.cache."
                        "gpu_memory_utilization; default: 0.9)")
    p.add_argument("--kv-spill-memory", type=float, default=None, metavar="GiB",
                   help="host memory per worker for prefix-cache blocks evicted from the "
                        "KV pool, restored on a prefix hit instead of recomputed (engine."
                        "cache.spill_memory_bytes; int8 on CPU; default: 0, off)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="JSON or TOML file with RouterConfig fields, [engine] and [server]")


def settings_from_args(args: argparse.Namespace) -> Settings:
    data = load_config_file(args.config) if args.config else {}
    server_data = dict(data.pop("server", {}) or {})
    if "model" in data:
        data.setdefault("engine", {})["model"] = data.pop("model")
    env_key = os.environ.get(API_KEY_ENV)
    if env_key:
        server_data["api_key"] = env_key
    for name in ROUTER_FLAGS:
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
            if name.endswith("_resources"):  # JSON text on the command line
                data[name] = parse_resources("--" + name.replace("_", "-"), data[name])
    for name in SERVER_FLAGS:
        if getattr(args, name) is not None:
            server_data[name] = getattr(args, name)
    if args.model is not None:
        data.setdefault("engine", {})["model"] = args.model
    if getattr(args, "prefix_cache", None) is False:
        _set_engine(data, "cache", "enable_prefix_caching", False)
    if getattr(args, "cuda_graphs", None) is False:
        data.setdefault("engine", {})["cuda_graphs"] = False
    if getattr(args, "kv_cache_dtype", None) is not None:
        _set_engine(data, "cache", "kv_cache_dtype", args.kv_cache_dtype)
    for name in ("max_num_batched_tokens", "max_num_seqs"):
        if getattr(args, name, None) is not None:
            _set_engine(data, "scheduler", name, getattr(args, name))
    for flag, key in (("kv_cache_memory", "memory_bytes"),
                      ("kv_spill_memory", "spill_memory_bytes")):
        if getattr(args, flag, None) is not None:
            _set_engine(data, "cache", key, gib_to_bytes(f"--{flag.replace('_', '-')}",
                                                         getattr(args, flag)))
    if getattr(args, "gpu_memory_utilization", None) is not None:
        _set_engine(data, "cache", "gpu_memory_utilization", args.gpu_memory_utilization)
    return Settings(from_dict(RouterConfig, data, "config"),
                    from_dict(ServerConfig, server_data, "server"))


def gib_to_bytes(flag: str, gib: float) -> int:
    if not gib >= 0:  # also NaN
        raise ConfigError(f"{flag} must be >= 0 GiB, got {gib}")
    return int(gib * (1 << 30))


def _set_engine(data: dict[str, Any], section: str, key: str, value: Any) -> None:
    """data["engine"][section][key] = value, keeping what the config file set there."""
    engine = data.setdefault("engine", {})
    engine[section] = {**(engine.get(section) or {}), key: value}


def load_config_file(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    toml = path.endswith(".toml")
    try:
        data = tomllib.loads(raw.decode()) if toml else json.loads(raw)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path}: not valid {'TOML' if toml else 'JSON'}: {e}"
                          ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a table/object")
    return data


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build a (nested) config dataclass; unknown keys are errors naming their path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table/object, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                          f"{cls.__name__} has {', '.join(sorted(fields))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{where}.{key}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return None


def _scalar_type(hint: Any) -> type:
    """int | None -> int, float -> float, str | None -> str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    t = args[0]
    return t if t in (int, float, str) else str
