"""Hugging Face model directories -> ModelConfig, without torch (the router reads it too).

config.json is the architecture; generation_config.json adds end-of-turn ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

from engine.config import ModelConfig


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
