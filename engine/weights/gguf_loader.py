"""GGUF (llama.cpp) checkpoints -> Hugging Face-named tensors (the config: gguf_config).

Three things differ from a Hugging Face checkpoint, and each is undone here:
- names: ``blk.N.attn_q.weight`` is ``model.layers.N.self_attn.q_proj.weight`` (tables below);
- q/k row order: llama.cpp rotates adjacent pairs (x0,x1),(x2,x3),... ("normal" RoPE),
  HF rotates halves (x_i, x_{i+d/2}) (``rotate_half``). For llama-arch models its
  converter permutes each head's q and k rows to make the two agree; unpermute_rope_rows
  restores HF order. qwen2 GGUFs keep HF order (llama.cpp runs them with neox RoPE).
- Llama 3 RoPE scaling: stored as a per-frequency factor tensor ``rope_freqs.weight``,
  not as parameters; gguf_config.fit_llama3_scaling recovers the parameters from it.
GGUF dims are in ggml ``ne`` order (innermost first); gguf_file reverses them, so a
matrix comes out ``[out_features, in_features]`` like nn.Linear.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.weights.errors import WeightLoadError
from engine.weights.gguf_config import ROPE_FREQS
from engine.weights.gguf_file import GGUFFile
from engine.weights.names import check_state_dict

_PERMUTED_ARCHS = ("llama",)  # archs whose q/k rows llama.cpp's converter permutes
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        if kind in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"
    elif base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    raise WeightLoadError(f"GGUF tensor {gguf_name!r} has no Llama-family equivalent")


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: per head, row 2j+t came from row t*d/2+j.

    (n_heads*d, ...) -> same shape, rows reordered so HF's rotate_half RoPE applies.
    The inverse of convert_hf_to_gguf.py's ``LlamaModel.permute``.
    """
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_state_dict(f: GGUFFile, config: ModelConfig, dtype: torch.dtype,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Dequantize every tensor (one at a time, via fp32 on CPU) into HF names and layout."""
    permuted = f.metadata.get("general.architecture") in _PERMUTED_ARCHS
    sd: dict[str, torch.Tensor] = {}
    for gname in f.tensors:
        if gname == ROPE_FREQS:
            continue
        name = hf_name(gname)
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        t = torch.from_numpy(f.read_tensor(gname))
        if permuted and ".self_attn.q_proj." in name:
            t = unpermute_rope_rows(t, config.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in name:
            t = unpermute_rope_rows(t, config.num_key_value_heads)
        sd[name] = t.to(device=device, dtype=dtype)
    check_state_dict(sd, config, f.path)
    return sd
