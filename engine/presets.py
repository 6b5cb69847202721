"""Named model shapes, for dummy (random) weights: ``--model dummy:<preset>``.

The full-size presets copy the published Hugging Face configs, so GPU benchmarks on
random weights do the same work per token as the real checkpoints. The ``tiny-*``
presets are for CPU tests: a few layers, but each exercises one feature the big
models have (llama3 RoPE scaling, qkv bias, tied embeddings with 3:1 GQA).
"""

from __future__ import annotations

from dataclasses import replace

from engine.config import ConfigError, ModelConfig, RopeScaling

_LLAMA3_SCALING = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)

_PRESETS: dict[str, ModelConfig] = {
    # HuggingFaceTB/SmolLM2-135M-Instruct (the embedded default's shape).
    "smollm2-135m": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
    ),
    # meta-llama/Llama-3.1-8B-Instruct (eos: end_of_text, eom, eot).
    "llama-3-8b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA3_SCALING, bos_token_id=128000,
        eos_token_ids=(128001, 128008, 128009),
    ),
    # Qwen/Qwen2-7B-Instruct.
    "qwen2-7b": ModelConfig(
        architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
        max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
        attention_bias=True, bos_token_id=151643, eos_token_ids=(151645, 151643),
    ),
    # mistralai/Mistral-7B-Instruct-v0.3 (no sliding window since v0.2).
    "mistral-7b": ModelConfig(
        architecture="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0,
        bos_token_id=1, eos_token_ids=(2,),
    ),
    # original_max_position_embeddings=256 puts head_dim 16's frequencies on all three
    # llama3 regimes (kept, smoothed, scaled by 8), so a missing scaling shows up even at
    # positions a CPU test reaches.
    "tiny-llama3": ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=replace(_LLAMA3_SCALING, original_max_position_embeddings=256),
        bos_token_id=1, eos_token_ids=(2,),
    ),
    "tiny-qwen2": ModelConfig(
        architecture="qwen2", vocab_size=512, hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1000000.0,
        attention_bias=True, bos_token_id=1, eos_token_ids=(2,),
    ),
    "tiny-smollm2-like": ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=96, intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
    ),
}
_PRESETS = {name: replace(cfg, name=name) for name, cfg in _PRESETS.items()}


def list_presets() -> list[str]:
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The ModelConfig of a named shape (its ``name`` field is the preset name)."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown model preset {name!r}; presets: {', '.join(list_presets())}"
        ) from None
