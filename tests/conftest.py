"""Shared pytest set-up: the `slow` marker is skipped unless asked for.

Run everything with ``PDSERVE_SLOW=1 make test`` (or ``pytest -m slow`` for only those).
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PDSERVE_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: set PDSERVE_SLOW=1 or pass -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
