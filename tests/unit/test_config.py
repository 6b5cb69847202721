"""Config parsing."""

from __future__ import annotations

from engine.config import ModelConfig


def test_sliding_window_caps_the_context() -> None:
    base = {"model_type": "mistral", "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 32768}
    assert ModelConfig.from_hf_dict({**base, "sliding_window": 4096}).max_position_embeddings \
        == 4096
    assert ModelConfig.from_hf_dict({**base, "sliding_window": None}).max_position_embeddings \
        == 32768
