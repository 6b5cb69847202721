"""The layering rules of docs/architecture.md, checked on the source.

Light modules stay torch-free (the router imports them and must not load torch or the
model), and packages import only downward: roles never import each other, the engine
knows nothing of the runtime, messages know nothing of who sends them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("prefill_worker", "decode_worker", "colocated_worker")
RUNTIME = ("router", *ROLES, "kvtransfer", "runtime", "messages", "bench")

TORCH_FREE = [
    "messages", "runtime.config", "runtime.actors", "kvtransfer", "kvtransfer.addresses",
    "engine.config", "engine.tokenizer", "engine.detokenizer", "engine.sampling_params",
    "engine.validation", "engine.weights", "engine.stats", "engine.logprobs",
    # the whole router process: service, gRPC and HTTP edges, lifecycle, CLI
    "router.service", "router.cli", "router.http.app",
]


def test_light_modules_do_not_import_torch() -> None:
    code = (f"import importlib, sys\nfor m in {TORCH_FREE!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def imports_of(package: str) -> dict[str, set[str]]:
    """Every module each file of ``package`` imports (TYPE_CHECKING imports included)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        found[rel] = names
    assert found, f"no sources under {package}/"
    return found


def violations(package: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{file} imports {name}" for file, names in imports_of(package).items()
            for name in sorted(names)
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize("role", ROLES)
def test_roles_do_not_import_each_other(role: str) -> None:
    assert violations(role, tuple(r for r in ROLES if r != role)) == []


@pytest.mark.parametrize("package", ["engine", "kernels"])
def test_engine_and_kernels_know_no_runtime(package: str) -> None:
    assert violations(package, RUNTIME) == []


def test_messages_import_no_sender_or_receiver() -> None:
    assert violations("messages", ("router", *ROLES, "kvtransfer", "runtime")) == []


def test_kvtransfer_knows_no_worker() -> None:
    """Backends reach a peer worker through kvtransfer.peer.KVPeer, not its classes."""
    assert violations("kvtransfer", ("router", *ROLES, "runtime")) == []


def test_router_imports_no_torch_model_or_workers() -> None:
    forbidden = ("torch", "engine.llm_engine", "engine.model_runner", "engine.model",
                 "kernels", "bench", *ROLES)
    assert violations("router", forbidden) == []
