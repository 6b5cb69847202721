"""GGUF (llama.cpp) metadata -> ModelConfig, without torch (the router reads it too).

Llama 3 RoPE scaling is stored as a per-frequency factor tensor ``rope_freqs.weight``,
not as parameters; fit_llama3_scaling recovers the parameters from it. The weights
themselves are read by gguf_loader.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

from engine.config import ModelConfig, RopeScaling
from engine.weights.errors import WeightLoadError
from engine.weights.gguf_file import GGUFFile

_SUPPORTED_ARCHS = ("llama", "qwen2")
ROPE_FREQS = "rope_freqs.weight"  # becomes ModelConfig.rope_scaling, not a weight
_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
             "tokenizer.ggml.eom_token_id")  # llama.cpp stops on any of these
_LLAMA3_ORIGINAL_CONTEXT = 8192  # Llama 3.x's value; llama.cpp's GGUFs do not store it

T = TypeVar("T", int, float)


def llama3_rope_factors(s: RopeScaling, base: float, dim: int) -> np.ndarray:
    """(dim/2,) per-frequency divisors, as llama.cpp's converter writes rope_freqs."""
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    orig = s.original_max_position_embeddings
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = 1 / ((1 - smooth) / s.factor + smooth)
    out = np.where(wavelen < orig / s.high_freq_factor, 1.0, mid)
    return np.where(wavelen > orig / s.low_freq_factor, s.factor, out)


def fit_llama3_scaling(factors: np.ndarray, base: float, dim: int,
                       original: int | None = None) -> RopeScaling:
    """Recover llama3 RoPE parameters from the factors llama3_rope_factors made.

    The factors depend only on low/orig and high/orig (the two wavelength thresholds),
    and the smoothed ones are linear in 1/wavelength, so two or more smoothed factors
    fix both thresholds. The triple is then written with low = 1, as every Llama 3.x
    release has it (or with ``original`` when the metadata gives it). With fewer
    smoothed factors any thresholds that keep each frequency in its regime are exact;
    Llama 3's ratio high/low = 4 is tried first. Every candidate must reproduce
    ``factors``.
    """
    factors = np.asarray(factors, dtype=np.float64)
    factor = _f32(float(factors.max()))
    inv_wl = base ** -(np.arange(0, dim, 2, dtype=np.float64) / dim) / (2 * math.pi)
    mid = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
    orig = original or _LLAMA3_ORIGINAL_CONTEXT
    cands: list[tuple[int, float, float]] = []  # (original, low, high)
    if mid.sum() >= 2:
        slope, icpt = np.polyfit(inv_wl[mid], smooth, 1)
        low_t, high_t = -icpt / slope, -icpt / slope + 1 / slope  # low/orig, high/orig
        if not original:
            cands.append((round(1 / low_t), 1.0, high_t / low_t))
    else:
        if mid.sum() == 1:
            cands.append((round(float((3 * smooth[0] + 1) / inv_wl[mid][0])), 1.0, 4.0))
        low_t, high_t = _thresholds_between_regimes(factors, factor, inv_wl, mid, smooth)
    cands.append((orig, orig * low_t, orig * high_t))
    for o, low, high in cands:
        for lo, hi in ((round(float(low), 4), round(float(high), 4)), (float(low), float(high))):
            s = RopeScaling(factor, lo, hi, int(o))
            if np.allclose(llama3_rope_factors(s, base, dim), factors, rtol=1e-6, atol=0):
                return s
    raise WeightLoadError(f"rope_freqs {factors.tolist()} is not a llama3 RoPE scaling")


def _thresholds_between_regimes(
    factors: np.ndarray, factor: float, inv_wl: np.ndarray, mid: np.ndarray,
    smooth: np.ndarray,
) -> tuple[float, float]:
    """(low/orig, high/orig) for at most one smoothed factor: frequencies below low/orig
    are scaled, above high/orig kept, and the smoothed one lands at its value."""
    scaled = inv_wl[factors >= factor * (1 - 1e-4)]
    kept = inv_wl[factors <= 1 + 1e-4]
    floor = scaled.max() if scaled.size else inv_wl.min() / 2
    ceil = kept.min() if kept.size else inv_wl.max() * 2
    if not mid.any():
        return floor * (ceil / floor) ** (1 / 3), floor * (ceil / floor) ** (2 / 3)
    y, s = float(inv_wl[mid][0]), float(smooth[0])
    # high_t = low_t + (y - low_t) / s stays below ceil iff low_t > (y - s*ceil) / (1 - s).
    low_t = (max(floor, (y - s * ceil) / (1 - s)) + y) / 2
    return low_t, low_t + (y - low_t) / s


def gguf_model_config(f: GGUFFile, name: str) -> ModelConfig:
    """ModelConfig from GGUF metadata (and tensor shapes; no tensor data but rope_freqs)."""
    md = f.metadata
    arch = md.get("general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise WeightLoadError(f"{f.path}: GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(_SUPPORTED_ARCHS)})")
    heads = _num(f, f"{arch}.attention.head_count", int)
    hidden = _num(f, f"{arch}.embedding_length", int)
    head_dim = _num(f, f"{arch}.attention.key_length", int,
                    _num(f, f"{arch}.rope.dimension_count", int, hidden // heads))
    if _num(f, f"{arch}.rope.dimension_count", int, head_dim) != head_dim:
        raise WeightLoadError(f"{f.path}: partial rotary embeddings are not supported")
    if md.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise WeightLoadError(f"{f.path}: rope scaling {md[f'{arch}.rope.scaling.type']!r} "
                              "is not supported")
    theta = _f32(_num(f, f"{arch}.rope.freq_base", float, 10000.0))
    scaling = None
    if ROPE_FREQS in f.tensors:
        original = f.metadata.get(f"{arch}.rope.scaling.original_context_length")
        scaling = fit_llama3_scaling(f.read_tensor(ROPE_FREQS), theta, head_dim,
                                     int(original) if original else None)
    if "token_embd.weight" not in f.tensors:
        raise WeightLoadError(f"{f.path}: GGUF has no token_embd.weight")
    eos = [md[k] for k in _EOS_KEYS if k in md]
    return ModelConfig(
        architecture=arch,
        # The embedding's rows are the vocabulary the logits span (tokenizers may list fewer).
        vocab_size=f.tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=_num(f, f"{arch}.feed_forward_length", int),
        num_hidden_layers=_num(f, f"{arch}.block_count", int),
        num_attention_heads=heads,
        num_key_value_heads=_num(f, f"{arch}.attention.head_count_kv", int, heads),
        head_dim=head_dim,
        max_position_embeddings=_num(f, f"{arch}.context_length", int, 4096),
        rms_norm_eps=_f32(_num(f, f"{arch}.attention.layer_norm_rms_epsilon", float)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in f.tensors,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in f.tensors,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        name=name,
    )


def _num(f: GGUFFile, key: str, kind: type[T], default: T | None = None) -> T:
    """A numeric metadata value; per-layer lists (some archs vary heads by layer) refused."""
    v = f.metadata.get(key, default)
    if v is None:
        raise WeightLoadError(f"{f.path}: GGUF metadata lacks {key}")
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise WeightLoadError(f"{f.path}: GGUF {key} = {v!r} is not a number "
                              "(per-layer values are not supported)")
    return kind(v)


def _f32(x: float) -> float:
    """The shortest decimal of a float32 value: GGUF's 1e-5 reads as 9.99999975e-06."""
    return float(str(np.float32(x)))
