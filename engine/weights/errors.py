"""Errors raised while finding or loading a model's weights."""

from __future__ import annotations

from engine.errors import EngineError


class ModelSourceError(EngineError, ValueError):
    """The model name or path does not name a model pdserve can load; the message lists
    what would."""


class WeightLoadError(EngineError, ValueError):
    """A checkpoint's tensors do not fit the model config (missing, unexpected, wrong
    shape) or its format is not supported."""
