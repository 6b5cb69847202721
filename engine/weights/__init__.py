"""Model weights: find a model (resolve_model), read its shape (load_model_config), load
its tensors under Hugging Face names (load_state_dict). Sources: GGUF files (the
embedded SmolLM2 default), Hugging Face safetensors directories, and dummy random
weights of a named preset (engine.presets).

    src = resolve_model("smollm2-135m")
    cfg = load_model_config(src)
    sd = load_state_dict(src, cfg, torch.bfloat16, "cuda")

Finding a model and reading its config are torch-free (the router does both); the
tensor parts load lazily, on first use of load_state_dict or param_shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.weights.errors import ModelSourceError, WeightLoadError
from engine.weights.model_config import load_model_config
from engine.weights.source import DEFAULT_MODEL, ModelSource, resolve_model

if TYPE_CHECKING:
    from engine.weights.loader import load_state_dict
    from engine.weights.names import param_shapes

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


def __getattr__(name: str) -> Any:
    if name == "load_state_dict":
        from engine.weights.loader import load_state_dict

        return load_state_dict
    if name == "param_shapes":
        from engine.weights.names import param_shapes

        return param_shapes
    raise AttributeError(name)
