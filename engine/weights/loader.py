"""The two entry points: a source's ModelConfig (cheap) and its state dict (the weights).

Every loader returns the same thing: Hugging Face parameter names and layouts
(``model.layers.0.self_attn.q_proj.weight`` is ``[q_size, hidden]``), exactly the
tensors of ``names.param_shapes(config)``, no ``lm_head.weight`` when embeddings are
tied. The caller owns the returned tensors; nothing here keeps a reference.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.config import ModelConfig
from engine.presets import get_preset
from engine.weights.dummy import dummy_state_dict
from engine.weights.hf_loader import hf_model_config, hf_state_dict
from engine.weights.source import ModelSource


def load_model_config(src: ModelSource) -> ModelConfig:
    """Architecture from metadata only (GGUF header, config.json, or the preset)."""
    if src.kind == "gguf":
        # Imported here: the gguf package is only needed for GGUF models (GPU machines
        # run dummy weights without it).
        from engine.weights.gguf_file import read_gguf
        from engine.weights.gguf_loader import gguf_model_config

        assert src.path is not None
        return gguf_model_config(read_gguf(src.path), src.name)
    if src.kind == "hf":
        assert src.path is not None
        return hf_model_config(src.path, src.name)
    assert src.preset is not None
    return replace(get_preset(src.preset), name=src.name)


def load_state_dict(
    src: ModelSource, config: ModelConfig, dtype: torch.dtype,
    device: torch.device | str = "cpu", seed: int = 0,
) -> dict[str, torch.Tensor]:
    """All weights as HF-named tensors of ``dtype`` on ``device``.

    ``seed`` only matters for dummy weights. Raises WeightLoadError when the checkpoint
    does not match ``config``.
    """
    device = torch.device(device)
    if src.kind == "gguf":
        from engine.weights.gguf_file import read_gguf
        from engine.weights.gguf_loader import gguf_state_dict

        assert src.path is not None
        return gguf_state_dict(read_gguf(src.path), config, dtype, device)
    if src.kind == "hf":
        assert src.path is not None
        return hf_state_dict(src.path, config, dtype, device)
    return dummy_state_dict(config, dtype, device, seed)
