"""Frozen configuration dataclasses, validated on construction.

One dataclass per concern: the model's architecture (ModelConfig), the KV cache
(CacheConfig), the scheduler's batching limits (SchedulerConfig), and the bundle an
engine is built from (EngineConfig). CLI flags and worker configs derive from these.

Importable without torch (the router reads these configs and must stay light): torch
is imported only inside the methods that return torch objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# RoPE table size and the context cap for very long-context models (their full context
# would only cost memory here: requests that long are not served on these pools).
MAX_POSITIONS_CAP = 32768


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency-dependent RoPE scaling (``rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2).

    Field names follow Hugging Face ``config.json`` so a config round-trips to
    ``transformers.LlamaConfig`` / ``Qwen2Config`` for reference tests.
    """

    architecture: str  # "llama" | "qwen2" | "mistral" (mistral is llama-shaped)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim",
            "max_position_embeddings",
        )
        for f in positive:
            if getattr(self, f) <= 0:
                raise ConfigError(f"ModelConfig.{f} must be > 0, got {getattr(self, f)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                "ModelConfig.num_attention_heads must be a multiple of num_key_value_heads "
                f"({self.num_attention_heads} vs {self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.architecture not in ("llama", "qwen2", "mistral"):
            raise ConfigError(f"ModelConfig.architecture {self.architecture!r} is not supported")

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_hidden_layers * layer + h + head

    def to_hf_dict(self) -> dict[str, Any]:
        """The equivalent Hugging Face config.json contents."""
        d: dict[str, Any] = {
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) or None,
        }
        if self.architecture == "llama":
            d["attention_bias"] = self.attention_bias
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            d["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": rs.factor,
                "low_freq_factor": rs.low_freq_factor,
                "high_freq_factor": rs.high_freq_factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings,
            }
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "model") -> ModelConfig:
        """Build from a Hugging Face config.json dict (llama, mistral, qwen2)."""
        arch = d.get("model_type", "llama")
        if arch not in ("llama", "qwen2", "mistral"):
            raise ConfigError(f"model_type {arch!r} is not a supported Llama-family model")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        scaling = None
        rs = d.get("rope_scaling") or (d.get("rope_parameters") or {})
        rope_type = rs.get("rope_type", rs.get("type")) if rs else None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(rs["factor"]),
                low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            )
        elif rope_type not in (None, "default"):
            raise ConfigError(f"rope_scaling type {rope_type!r} is not supported")
        theta = d.get("rope_theta") or (rs.get("rope_theta") if rs else None) or 10000.0
        max_pos = d.get("max_position_embeddings", 4096)
        window = d.get("sliding_window") if d.get("use_sliding_window", True) else None
        if window and window < max_pos:
            # No sliding-window attention here: capping the context at the window keeps
            # every request it serves exact (full attention == windowed attention).
            max_pos = int(window)
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(d.get("attention_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
        )


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache.

    ``num_blocks`` wins when set; otherwise the pool is sized from ``memory_bytes``
    (default: enough for ``max_num_seqs`` full-length sequences, capped at 2 GiB on any
    device: a GPU's pool is sized the same way; set ``memory_bytes`` for a bigger one).
    Block 0 is the reserved null block, so ``num_blocks - 1`` blocks are usable.
    """

    block_size: int = 16
    num_blocks: int | None = None
    memory_bytes: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        bs = self.block_size
        if bs <= 0 or bs & (bs - 1):
            raise ConfigError(f"CacheConfig.block_size must be a power of two, got {bs}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ConfigError(f"CacheConfig.num_blocks must be >= 2, got {self.num_blocks}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ConfigError("CacheConfig.memory_bytes must be > 0")


SCHEDULER_POLICIES = ("fcfs", "shortest_first")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching limits of one scheduler step.

    max_num_batched_tokens: token budget of one forward pass (decode tokens plus
        prefill chunks); long prompts are chunked to fit it.
    max_num_seqs: most requests running at once (each decode step is this wide at most).
    policy: who gets the budget first. "fcfs": running requests oldest first, then
        waiting ones in arrival order (the engine's default: decode never waits behind
        a new prompt). "shortest_first": every unfinished request, running or waiting,
        by the tokens it still has to compute, fewest first (prefill workers: a short
        prompt is not stuck behind a long prompt's chunks).
    max_wait_s: under "shortest_first", a request that has gone this long without being
        given any tokens goes before shorter ones, so long prompts are never starved.
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    policy: str = "fcfs"
    max_wait_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ConfigError(f"SchedulerConfig.max_num_seqs must be > 0, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ConfigError("SchedulerConfig.max_num_batched_tokens must be > 0")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError("SchedulerConfig.max_model_len must be > 0")
        if self.policy not in SCHEDULER_POLICIES:
            raise ConfigError(f"SchedulerConfig.policy {self.policy!r} is not one of "
                              f"{', '.join(SCHEDULER_POLICIES)}")
        if self.max_wait_s <= 0:
            raise ConfigError("SchedulerConfig.max_wait_s must be > 0")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine (or a worker's engine) is built from."""

    model: str = "smollm2-135m"
    dtype: str = "auto"  # auto: fp32 on CPU, bf16 on CUDA
    device: str = "auto"  # auto: cuda if available, else cpu
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads on CPU; None leaves torch's default
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"EngineConfig.dtype {self.dtype!r} is not one of auto/float32/"
                              "bfloat16/float16")
        if self.num_threads is not None and self.num_threads <= 0:
            raise ConfigError("EngineConfig.num_threads must be > 0")

    def resolve_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


def max_model_len(config: EngineConfig, model: ModelConfig) -> int:
    """The longest sequence (prompt + output) an engine of this config serves: the
    scheduler's limit if set, never beyond the model's positions or MAX_POSITIONS_CAP."""
    positions = model.max_position_embeddings
    return min(config.scheduler.max_model_len or positions, positions, MAX_POSITIONS_CAP)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_num_blocks(
    model: ModelConfig, cache: CacheConfig, sched: SchedulerConfig, dtype: torch.dtype
) -> int:
    """Pool size when CacheConfig.num_blocks is unset (see CacheConfig)."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    elem = dtype.itemsize
    per_block = model.num_hidden_layers * 2 * cache.block_size * model.kv_size * elem
    if cache.memory_bytes is not None:
        return max(2, cache.memory_bytes // per_block)
    max_len = sched.max_model_len or model.max_position_embeddings
    want = sched.max_num_seqs * cdiv(min(max_len, 4096), cache.block_size) + 1
    cap = max(2, (2 << 30) // per_block)
    return max(2, min(want, cap, math.ceil(want)))
