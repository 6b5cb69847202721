"""Hugging Face model directories: config.json (+ generation_config.json) and safetensors.

Tensor names are already the HF names every loader produces, so loading is reading,
casting and checking. Sharded checkpoints are found through
``model.safetensors.index.json``; without an index every ``*.safetensors`` is read.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import replace

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.weights.errors import WeightLoadError
from engine.weights.names import check_state_dict

_INDEX = "model.safetensors.index.json"


def hf_model_config(path: str, name: str) -> ModelConfig:
    """ModelConfig from config.json; eos ids also from generation_config.json.

    Chat models list their end-of-turn tokens only in generation_config.json (Llama 3:
    config.json says 128001, generation stops at 128008/128009 too), so both are kept.
    """
    with open(os.path.join(path, "config.json")) as fh:
        config = ModelConfig.from_hf_dict(json.load(fh), name=name)
    gen_path = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen_path):
        return config
    with open(gen_path) as fh:
        eos = json.load(fh).get("eos_token_id")
    extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
    return replace(config, eos_token_ids=tuple(dict.fromkeys([*config.eos_token_ids, *extra])))


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, _INDEX)
    if os.path.isfile(index):
        with open(index) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise WeightLoadError(f"{path}: no *.safetensors files (other checkpoint formats, "
                              "e.g. pytorch_model.bin, are not supported)")
    return files


def hf_state_dict(path: str, config: ModelConfig, dtype: torch.dtype,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Read every tensor (one at a time through CPU), cast to ``dtype`` on ``device``."""
    sd: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                # Old checkpoints saved RoPE's inv_freq buffer; tied ones may repeat the
                # embedding as lm_head. Neither is a parameter of ours.
                if name.endswith("rotary_emb.inv_freq") or (
                        name == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                sd[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    check_state_dict(sd, config, path)
    return sd
