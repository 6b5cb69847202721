"""The router: owns the worker actors, routes requests, streams tokens (see core.py)."""
