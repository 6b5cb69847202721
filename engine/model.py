"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over the paged KV cache.

The forward pass takes the step's tokens flattened to one sequence-major batch (T tokens
from B requests); attention finds each request's KV through ForwardContext. Projections
are fused (qkv, gate_up) so a layer is four matmuls; weights load from Hugging Face
names (engine.weights produces them from GGUF, HF directories or dummy presets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from engine.config import ModelConfig
from engine.kv_layout import layer_view
from engine.linear import Linear
from kernels import AttentionMetadata, paged_attention, rms_norm, rotary_store_kv, silu_and_mul


@dataclass
class ForwardContext:
    """What one forward pass needs besides token ids; built by the ModelRunner per step."""

    positions: torch.Tensor  # (T,) int64
    slot_mapping: torch.Tensor  # (T,) int64, -1 = don't store
    attn: AttentionMetadata
    kv_cache: torch.Tensor  # (num_blocks, num_layers, 2, block_size, Hkv, D)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, including Llama 3 scaling; mirrors transformers' maths."""
    d = cfg.head_dim
    exps = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    inv_freq = 1.0 / (cfg.rope_theta**exps)
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(cfg: ModelConfig, max_positions: int) -> torch.Tensor:
    """(max_positions, head_dim) fp32 table: [cos | sin] of position * inv_freq."""
    inv_freq = rope_inv_freq(cfg)
    freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size,
                                  bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=False)
        self.scale = cfg.head_dim**-0.5

    def forward(self, x: torch.Tensor, ctx: ForwardContext, cos_sin: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, (Hq + 2 Hkv) * D)
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.view(t, self.hq, self.d)
        k = k.view(t, self.hkv, self.d)
        v = v.view(t, self.hkv, self.d)
        cache = layer_view(ctx.kv_cache, self.layer)  # (num_blocks, 2, bs, Hkv, D)
        # qkv is ours: the native CPU path may rotate q and k in place.
        q, _ = rotary_store_kv(q, k, v, ctx.positions, cos_sin, cache, ctx.slot_mapping)
        o = paged_attention(q, cache, ctx.attn, self.scale)  # (T, Hq, D)
        return self.o_proj(o.view(t, self.hq * self.d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        ctx: ForwardContext,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # first layer: the embeddings are the residual stream
            residual = x
            h, _ = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, ctx, cos_sin)
        h, residual = self.post_attention_layernorm(h, residual)
        assert residual is not None
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.max_positions = max_positions
        self.register_buffer("cos_sin", rope_cos_sin(cfg, max_positions), persistent=False)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @classmethod
    def build(
        cls, cfg: ModelConfig, sd: dict[str, torch.Tensor], max_positions: int,
        device: torch.device, dtype: torch.dtype,
    ) -> LlamaModel:
        """Construct without random init (meta device), then load the weights."""
        with torch.device("meta"):
            model = cls(cfg, max_positions)
        model = model.to(dtype).to_empty(device=device)
        model.tie_weights()
        model.cos_sin = rope_cos_sin(cfg, max_positions).to(device)
        model.load_hf_state_dict(sd)
        for m in model.modules():
            if isinstance(m, Linear):
                m.prepack()
        return model.eval()

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """(T,) token ids -> (T, hidden) final hidden states."""
        h = self.embed_tokens(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            h, residual = layer(h, residual, ctx, self.cos_sin)
        h, _ = self.norm(h, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, hidden) -> (S, vocab) fp32 logits."""
        return self.lm_head(hidden).float()

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face-named weights, fusing q/k/v and gate/up as they come."""
        sd = dict(sd)  # popped below; leave the caller's dict alone
        own = dict(self.named_parameters())
        seen: set[str] = set()

        def put(name: str, value: torch.Tensor) -> None:
            p = own[name]
            if p.shape != value.shape:
                raise ValueError(f"weight {name}: shape {tuple(value.shape)} != {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(value)
            seen.add(name)

        for i in range(self.config.num_hidden_layers):
            attn, own_attn = f"model.layers.{i}.self_attn.", f"layers.{i}.self_attn."
            put(own_attn + "qkv_proj.weight", torch.cat(
                [sd.pop(attn + f"{n}_proj.weight") for n in ("q", "k", "v")]))
            if self.config.attention_bias:
                put(own_attn + "qkv_proj.bias", torch.cat(
                    [sd.pop(attn + f"{n}_proj.bias") for n in ("q", "k", "v")]))
            mlp, own_mlp = f"model.layers.{i}.mlp.", f"layers.{i}.mlp."
            put(own_mlp + "gate_up_proj.weight", torch.cat(
                [sd.pop(mlp + "gate_proj.weight"), sd.pop(mlp + "up_proj.weight")]))
        for hf_name, value in sd.items():
            name = hf_name.removeprefix("model.")
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if name not in own:
                raise ValueError(f"unexpected weight {hf_name}")
            put(name, value)
        if self.config.tie_word_embeddings:
            seen.add("lm_head.weight")
        missing = set(own) - seen
        if missing:
            raise ValueError(f"missing weights: {sorted(missing)[:5]}")
