"""The GPU verification kit's plan: its steps, their time budgets, and the JSON they write.

Torch-free on purpose: the suite's parent process, the dry run and the unit test read
this without loading anything heavy. Each step lives in its own module (``module``)
with ``run(ctx)``, ``SCHEMA`` (what its ``result`` holds), ``FAKE`` (an example result)
and ``headline(result)`` (the figures the summary and the docs quote).

Budgets are caps, not estimates: the suite kills a step at its budget and goes on. They
sum, with the per-step start-up allowance, to at most TOTAL_BUDGET_S, so one run fits
a 10-minute device command with room to spare for installing the carried wheels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TOTAL_BUDGET_S = 480  # the "under 8 minutes"
STEP_OVERHEAD_S = 6  # a step's own python + torch start-up, on top of its budget
STATUSES = ("ok", "failed", "timeout", "skipped")


@dataclass(frozen=True)
class Step:
    key: str  # "a".."f": the order
    name: str  # file stem of its JSON: "<key>-<name>.json"
    module: str
    budget_s: int
    measures: str  # one line, quoted by the summary and docs/benchmarks.md

    @property
    def filename(self) -> str:
        return f"{self.key}-{self.name}.json"


PLAN: tuple[Step, ...] = (
    Step("a", "env", "bench.gpu_env", 20,
         "GPU, memory, driver/CUDA, versions, imports; device copy GB/s and bf16 TFLOP/s"),
    Step("b", "kernels", "bench.gpu_kernels_step", 100,
         "tests/kernels compiled on the GPU; decode attention vs copy bandwidth, prefill "
         "vs SDPA"),
    Step("c", "engine", "bench.gpu_engine_check", 32,
         "engine vs transformers, same random weights (tiny Llama-3, Qwen2): greedy tokens "
         "in fp32 and bf16"),
    Step("d", "decode", "bench.gpu_decode", 80,
         "dummy:llama-3-8b decode step at batch 1/8/64 vs the weight+KV read roofline; "
         "forward eager vs CUDA graph; host syncs; Triton compiles"),
    Step("e", "transfer", "bench.gpu_transfer", 44,
         "cuda-ipc between two Ray actors at 0.5 GPU each, 2-256 MiB, vs a device copy"),
    Step("f", "serving", "bench.gpu_serving", 168,
         "pdserve serve dummy:llama-3-8b, 1P+1D vs 2 colocated at 0.5 GPU: TTFT, TPOT, "
         "goodput"),
)


def plan_seconds(plan: tuple[Step, ...] = PLAN) -> int:
    return sum(s.budget_s + STEP_OVERHEAD_S for s in plan)


def check_plan(plan: tuple[Step, ...] = PLAN, total_s: int = TOTAL_BUDGET_S) -> list[str]:
    """What is wrong with a plan (empty when it is fine)."""
    problems = []
    keys = [s.key for s in plan]
    if keys != sorted(keys) or len(set(keys)) != len(keys):
        problems.append(f"step keys must be unique and in order, got {keys}")
    if len({s.name for s in plan}) != len(plan):
        problems.append("step names must be unique")
    problems += [f"step {s.key} has no time budget" for s in plan if s.budget_s <= 0]
    if plan_seconds(plan) > total_s:
        problems.append(f"plan needs {plan_seconds(plan)} s with start-up, over the "
                        f"{total_s} s budget")
    return problems


# -- a small JSON schema language --------------------------------------------------------
# A spec is a type (or tuple of types) a value must be an instance of; a dict {key: spec}
# for an object with those keys ("?key" marks an optional one; "*" gives the spec of
# every other key, for free-form maps); or [spec] for a list of such items.
NUM = (int, float)
OPT_NUM = (int, float, type(None))
OPT_STR = (str, type(None))


def validate(value: Any, spec: Any, path: str = "$") -> list[str]:
    """Every way ``value`` departs from ``spec``, as 'path: problem' strings."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        errors: list[str] = []
        named = {k.lstrip("?") for k in spec if k != "*"}
        for key, sub in spec.items():
            if key == "*":
                continue
            name = key.lstrip("?")
            if name in value:
                errors += validate(value[name], sub, f"{path}.{name}")
            elif not key.startswith("?"):
                errors.append(f"{path}: missing key {name!r}")
        if "*" in spec:
            for k, v in value.items():
                if k not in named:
                    errors += validate(v, spec["*"], f"{path}.{k}")
        return errors
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in validate(item, spec[0], f"{path}[{i}]")]
    # bool is an int in Python; a number field must not accept True silently.
    if isinstance(value, bool) and bool not in (spec if isinstance(spec, tuple) else (spec,)):
        return [f"{path}: expected {_names(spec)}, got bool"]
    if not isinstance(value, spec):
        return [f"{path}: expected {_names(spec)}, got {type(value).__name__}"]
    return []


def _names(spec: Any) -> str:
    types = spec if isinstance(spec, tuple) else (spec,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


# Every step's JSON: this envelope around its own ``result``.
ENVELOPE: dict[str, Any] = {
    "step": str,
    "name": str,
    "status": str,
    "toy": bool,
    "device": str,
    "budget_s": NUM,
    "wall_s": NUM,
    "error": OPT_STR,
    "checks": {"*": bool},  # named pass/fail verdicts of what the step verified
    "result": dict,
}

SUMMARY: dict[str, Any] = {
    "gpu": str,
    "toy": bool,
    "command": str,
    "started": str,
    "wall_s": NUM,
    "plan_budget_s": NUM,
    "code": {"commit": str, "dirty": bool},
    "all_ok": bool,
    "steps": [{
        "step": str, "name": str, "status": str, "budget_s": NUM, "wall_s": NUM,
        "file": str, "error": OPT_STR, "failed_checks": [str], "schema_errors": [str],
        "headline": {"*": (int, float, str, bool, type(None))},
    }],
}


def validate_step(doc: Any, result_schema: dict[str, Any]) -> list[str]:
    """The envelope always; the result only when the step says it completed."""
    errors = validate(doc, ENVELOPE)
    if errors:
        return errors
    if doc["status"] not in STATUSES:
        errors.append(f"$.status: {doc['status']!r} is not one of {', '.join(STATUSES)}")
    if doc["status"] == "ok":
        errors += validate(doc["result"], result_schema, "$.result")
    return errors


# -- what the GPU machine must provide -----------------------------------------------------
# (module the kit imports, the distribution that provides it). Each must be in the GPU
# image (GPU_IMAGE_PACKAGES) or among the wheels carried in .whl/ (bench/gpu_wheels.py).
REQUIRED_IMPORTS: tuple[tuple[str, str], ...] = (
    ("torch", "torch"), ("triton", "triton"), ("cupy", "cupy-cuda13x"),
    ("numpy", "numpy"), ("transformers", "transformers"), ("tokenizers", "tokenizers"),
    ("safetensors", "safetensors"), ("jinja2", "jinja2"), ("gguf", "gguf"),
    ("ray", "ray"), ("grpc", "grpcio"), ("grpc_health", "grpcio-health-checking"),
    ("grpc_reflection", "grpcio-reflection"), ("google.protobuf", "protobuf"),
    ("prometheus_client", "prometheus-client"), ("starlette", "starlette"),
    ("uvicorn", "uvicorn"), ("jsonschema", "jsonschema"), ("pytest", "pytest"),
)

# The GPU image's Python packages as KINDS.md listed them (read 2026-11-17). Only the
# ones the kit needs matter; the dry run checks REQUIRED_IMPORTS against this plus the
# wheels, so a package missing on both sides is found on CPU, not on the GPU.
GPU_IMAGE_PACKAGES: frozenset[str] = frozenset({
    "torch", "triton", "cupy-cuda13x", "numpy", "transformers", "tokenizers",
    "safetensors", "jinja2", "grpcio", "protobuf", "prometheus-client", "pytest",
    "pytest-xdist", "h11", "anyio", "click", "msgpack", "pyyaml", "requests", "filelock",
    "packaging", "aiohttp", "psutil", "tqdm", "sentencepiece", "nvidia-nccl-cu13",
    "nvidia-ml-py", "accelerate", "typing-extensions", "attrs", "idna", "certifi",
})


def missing_packages(wheels: frozenset[str]) -> list[str]:
    """Distributions the kit needs that neither the image nor the wheels provide."""
    have = GPU_IMAGE_PACKAGES | wheels
    return sorted({dist for _, dist in REQUIRED_IMPORTS if dist not in have})
