"""The Hugging Face parameter names and shapes every loader must produce.

One table, derived from ModelConfig, so the GGUF, safetensors and dummy loaders all
agree with each other and with ``ModelConfig.num_params()``. Shapes are PyTorch
``nn.Linear`` layout: ``[out_features, in_features]``.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.weights.errors import WeightLoadError


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's HF name -> shape; ``lm_head.weight`` is absent when tied."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.q_size, config.kv_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def check_state_dict(sd: dict[str, torch.Tensor], config: ModelConfig, origin: str) -> None:
    """Raise WeightLoadError unless ``sd`` has exactly the names and shapes of ``config``."""
    want = param_shapes(config)
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        raise WeightLoadError(
            f"{origin}: weights do not match the model config "
            f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''})"
        )
    for name, shape in want.items():
        if tuple(sd[name].shape) != shape:
            raise WeightLoadError(
                f"{origin}: {name} has shape {tuple(sd[name].shape)}, config wants {shape}"
            )
