"""A source's ModelConfig from metadata only, without torch (the router reads it too)."""

from __future__ import annotations

from dataclasses import replace

from engine.config import ModelConfig
from engine.presets import get_preset
from engine.weights.source import ModelSource


def load_model_config(src: ModelSource) -> ModelConfig:
    """Architecture from metadata only (GGUF header, config.json, or the preset)."""
    if src.kind == "gguf":
        # Imported here: the gguf package is only needed for GGUF models (GPU machines
        # run dummy weights without it).
        from engine.weights.gguf_config import gguf_model_config
        from engine.weights.gguf_file import read_gguf

        assert src.path is not None
        return gguf_model_config(read_gguf(src.path), src.name)
    if src.kind == "hf":
        from engine.weights.hf_config import hf_model_config

        assert src.path is not None
        return hf_model_config(src.path, src.name)
    assert src.preset is not None
    return replace(get_preset(src.preset), name=src.name)
