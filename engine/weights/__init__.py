"""Model weights: find a model (resolve_model), read its shape (load_model_config), load
its tensors under Hugging Face names (load_state_dict). Sources: GGUF files (the
embedded SmolLM2 default), Hugging Face safetensors directories, and dummy random
weights of a named preset (engine.presets).

    src = resolve_model("smollm2-135m")
    cfg = load_model_config(src)
    sd = load_state_dict(src, cfg, torch.bfloat16, "cuda")
"""

from __future__ import annotations

from engine.weights.errors import ModelSourceError, WeightLoadError
from engine.weights.loader import load_model_config, load_state_dict
from engine.weights.names import param_shapes
from engine.weights.source import DEFAULT_MODEL, ModelSource, resolve_model

__all__ = [
    "DEFAULT_MODEL",
    "ModelSource",
    "ModelSourceError",
    "WeightLoadError",
    "load_model_config",
    "load_state_dict",
    "param_shapes",
    "resolve_model",
]
