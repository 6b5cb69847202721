"""Hugging Face model directories: the safetensors weights (the config: hf_config).

Tensor names are already the HF names every loader produces, so loading is reading,
casting and checking. Sharded checkpoints are found through
``model.safetensors.index.json``; without an index every ``*.safetensors`` is read.
"""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open

from engine.config import ModelConfig
from engine.weights.errors import WeightLoadError
from engine.weights.names import check_state_dict

_INDEX = "model.safetensors.index.json"


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
