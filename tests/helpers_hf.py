"""Hugging Face transformers as the reference implementation, fed our weights.

Tests build the transformers model matching a ModelConfig and load the state dict our
loaders produced (strict: every name and shape must match), so any output difference
is in our model code, not in the weights.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig


def hf_model_from(config: ModelConfig, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An eval-mode fp32 transformers *ForCausalLM (sdpa attention) holding ``state_dict``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = config.to_hf_dict()
    # ModelConfig has no sliding window (we attend to the whole context), but
    # transformers' MistralConfig defaults to 4096: switch it off to match.
    d.setdefault("sliding_window", None)
    hf_config = AutoConfig.for_model(d.pop("model_type"), **d)
    model = AutoModelForCausalLM.from_config(
        hf_config, attn_implementation="sdpa", dtype=torch.float32
    )
    sd = {k: v.detach().to(device="cpu", dtype=torch.float32) for k, v in state_dict.items()}
    if config.tie_word_embeddings:
        # transformers lists the tied head in its state dict; it is the same tensor, so
        # giving it the embedding keeps strict loading strict and the tie intact.
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()
