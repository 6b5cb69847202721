"""Reading the Grafana dashboard's PromQL (cluster/grafana-dashboard.json) for tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana-dashboard.json"
# Grafana's built-in variables, as Prometheus needs them spelled out.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}


def dashboard_exprs(path: Path = DASHBOARD) -> list[str]:
    """Every target expression of every panel, rows' nested panels included."""
    return [t["expr"] for p in _panels(json.loads(path.read_text())["panels"])
            for t in p.get("targets", []) if t.get("expr")]


def for_prometheus(expr: str) -> str:
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return expr


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))
