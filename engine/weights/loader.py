"""A source's state dict: the weights (its ModelConfig, the cheap part: model_config).

Every loader returns the same thing: Hugging Face parameter names and layouts
(``model.layers.0.self_attn.q_proj.weight`` is ``[q_size, hidden]``), exactly the
tensors of ``names.param_shapes(config)``, no ``lm_head.weight`` when embeddings are
tied. The caller owns the returned tensors; nothing here keeps a reference.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.weights.dummy import dummy_state_dict
from engine.weights.hf_loader import hf_state_dict
from engine.weights.source import ModelSource


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
