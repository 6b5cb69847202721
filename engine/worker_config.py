"""Moved to runtime.config (worker roles and KV backends are the runtime's, not the
engine's). A re-export until router/config.py and router/settings.py import from there;
then delete this file."""

from __future__ import annotations

from runtime.config import KV_BACKENDS, ROLES, WorkerConfig

__all__ = ["KV_BACKENDS", "ROLES", "WorkerConfig"]
