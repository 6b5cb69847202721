"""Frozen configuration dataclasses, validated on construction.

One dataclass per concern: the model's architecture (ModelConfig), the KV cache
(CacheConfig), the scheduler's batching limits (SchedulerConfig), and the bundle an
engine is built from (EngineConfig). CLI flags and worker configs derive from these.

Importable without torch (the router reads these configs and must stay light): torch
is imported only inside the methods that return torch objects.
"""

from __future__ import annotations

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


KV_CACHE_DTYPES = ("auto", "int8", "fp8")
SPILL_DTYPES = ("auto", "int8", "same")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache.

    ``num_blocks`` wins when set, then ``memory_bytes``. Otherwise, on CPU: a budget of
    host memory (engine.pool_sizing): CPU_KV_FRACTION of this engine's ``host_share``
    of the memory available at startup, less its weights. On a GPU: what is
    left of this process's part of the GPU -- total memory x ``gpu_memory_utilization``
    x ``gpu_share`` -- once the weights and a forward pass's activations are counted,
    never more than is free now (see gpu_pool_bytes), and at most four times what
    ``max_num_seqs`` full-length sequences take.
    ``gpu_share``: the fraction of the GPU this engine may use; None takes the share Ray
    granted this actor (``num_gpus`` 0.5: two workers on one GPU), 1.0 outside Ray.
    ``host_share``: the same on CPU, the fraction of the host's available memory this
    engine may plan on; None is 1.0 (the router sets 1/N for N workers on a node).
    Block 0 is the reserved null block, so ``num_blocks - 1`` blocks are usable.
    ``spill_memory_bytes``: the prefix cache's second tier (engine.kv_spill), host
    memory that blocks evicted from the pool with a cached prefix go to and come back
    from on a prefix hit; 0 turns it off. ``spill_dtype``: how the tier stores blocks:
    "auto" is int8 rows (kernels.kv_quant, ~1/4 of fp32) on CPU when the pool holds
    floats and the pool's own format otherwise; "int8"; "same" (lossless).
    """

    block_size: int = 16
    num_blocks: int | None = None
    memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    gpu_share: float | None = None
    host_share: float | None = None
    spill_memory_bytes: int = 0
    spill_dtype: str = "auto"
    # "auto": the model dtype; "int8" (CPU, GPU) / "fp8" (e4m3, CUDA with fp8 support):
    # quantized rows with per-(token, head) fp32 scales (engine/kv_quant.py).
    kv_cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"CacheConfig.kv_cache_dtype {self.kv_cache_dtype!r} is not one "
                              f"of {'/'.join(KV_CACHE_DTYPES)}")
        bs = self.block_size
        if bs <= 0 or bs & (bs - 1):
            raise ConfigError(f"CacheConfig.block_size must be a power of two, got {bs}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ConfigError(f"CacheConfig.num_blocks must be >= 2, got {self.num_blocks}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ConfigError("CacheConfig.memory_bytes must be > 0")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("CacheConfig.gpu_memory_utilization must be in (0, 1]")
        if self.gpu_share is not None and not 0 < self.gpu_share <= 1:
            raise ConfigError("CacheConfig.gpu_share must be in (0, 1]")
        if self.host_share is not None and not 0 < self.host_share <= 1:
            raise ConfigError("CacheConfig.host_share must be in (0, 1]")
        if self.spill_memory_bytes < 0:
            raise ConfigError("CacheConfig.spill_memory_bytes must be >= 0")
        if self.spill_dtype not in SPILL_DTYPES:
            raise ConfigError(f"CacheConfig.spill_dtype {self.spill_dtype!r} is not one of "
                              f"{'/'.join(SPILL_DTYPES)}")


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
    # On CUDA, decode steps replay CUDA graphs (engine/decode_graphs.py); False runs every
    # step eagerly (a debugging aid, and the baseline bench/gpu_decode.py compares with).
    cuda_graphs: bool = True
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
    model: ModelConfig, cache: CacheConfig, sched: SchedulerConfig, dtype: torch.dtype,
    device: torch.device | None = None,
) -> int:
    """Pool size when CacheConfig.num_blocks is unset (see CacheConfig); ``device`` None
    or a CPU sizes for CPU."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    from engine.kv_quant import kv_block_bytes  # imports this module

    elem = dtype.itemsize
    per_block = kv_block_bytes(model, cache, dtype, device)  # int8/fp8 KV: ~1/4, 1/2
    if cache.memory_bytes is not None:
        return max(2, cache.memory_bytes // per_block)
    if device is not None and device.type == "cuda":
        return _gpu_num_blocks(model, cache, sched, elem, per_block, device)
    return _cpu_num_blocks(model, cache, sched, elem, per_block)


def _host_memory() -> int:
    """Bytes this process can still get on its host (a seam for tests)."""
    from engine.pool_sizing import host_available_bytes

    return host_available_bytes()


def _cpu_num_blocks(model: ModelConfig, cache: CacheConfig, sched: SchedulerConfig,
                    elem: int, per_block: int) -> int:
    """A budget of host memory (engine.pool_sizing), at least one sequence of up to
    4096 tokens, at most four full-length sequences per seat (as on GPUs)."""
    from engine.pool_sizing import cpu_pool_bytes

    share = cache.host_share if cache.host_share is not None else 1.0
    pool = cpu_pool_bytes(_host_memory(), share, model.num_params() * elem)
    max_len = min(sched.max_model_len or model.max_position_embeddings, MAX_POSITIONS_CAP)
    # The floor stops at 4096 tokens: a 32k-context model's full length would be a
    # multi-GiB floor on a host that has no room for it.
    one_seq = cdiv(min(max_len, 4096), cache.block_size) + 1
    cap = 4 * sched.max_num_seqs * cdiv(max_len, cache.block_size) + 1
    return max(2, one_seq, min(pool // per_block, cap))


# -- GPU pools -------------------------------------------------------------------------------
# CUDA context, cuBLAS workspaces, Triton's and the caching allocator's slack: room the pool
# must leave besides the weights and activations it can count.
GPU_SLACK_BYTES = 1 << 30


def activation_bytes(model: ModelConfig, sched: SchedulerConfig, elem: int) -> int:
    """A generous bound on one forward pass's transient memory: a step's tokens through
    the widest layer tensors (twice over, for the residual stream and temporaries), and
    the sampler's fp32 copies of the logits of every sequence."""
    per_token = 4 * model.hidden_size + model.q_size + 2 * model.kv_size \
        + 2 * model.intermediate_size
    logits = 4 * sched.max_num_seqs * model.vocab_size * 4
    return 2 * sched.max_num_batched_tokens * per_token * elem + logits


def gpu_pool_bytes(total: int, free: int, share: float, utilization: float, weights: int,
                   activations: int) -> int:
    """Bytes for the KV pool of one engine on a GPU of ``total`` bytes, ``free`` of them
    free before it loads anything.

    Its part of the GPU is total x utilization x share (prefill and decode at 0.5 each
    get half of 90% each, whoever starts first); from it go the weights twice (the
    loaded state dict and the model's fused copy are both alive when the pool is
    allocated), the activations and GPU_SLACK_BYTES (the decode CUDA graphs' private
    pool holds one decode batch's activations, well under a prefill step's). Never more
    than is free now, less the (1 - utilization) headroom the device keeps, less the
    same needs: memory another process already holds is not there to take.
    """
    need = 2 * weights + activations + GPU_SLACK_BYTES
    by_share = total * utilization * share - need
    by_free = free - total * (1 - utilization) - need
    return int(min(by_share, by_free))


def _ray_gpu_share() -> float | None:
    """The GPU fraction Ray granted this actor, if this process is one (ray is never
    imported here: only a process that already runs Ray can be a Ray actor)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    try:
        gpus = ray.get_runtime_context().get_assigned_resources().get("GPU")
    except Exception:  # not in a worker, or an older Ray: no share to read
        return None
    return min(float(gpus), 1.0) if gpus else None


def _gpu_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of ``device`` (a seam for tests)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def _gpu_num_blocks(model: ModelConfig, cache: CacheConfig, sched: SchedulerConfig,
                    elem: int, per_block: int, device: torch.device) -> int:
    share = cache.gpu_share if cache.gpu_share is not None else (_ray_gpu_share() or 1.0)
    free, total = _gpu_memory(device)
    weights = model.num_params() * elem
    pool = gpu_pool_bytes(total, free, share, cache.gpu_memory_utilization, weights,
                          activation_bytes(model, sched, elem))
    if pool < 2 * per_block:
        raise ConfigError(
            f"no room for a KV pool on {device}: {free / 2**30:.1f} of {total / 2**30:.1f} "
            f"GiB free, this engine's share {share:g} x utilization "
            f"{cache.gpu_memory_utilization:g}, weights {weights / 2**30:.1f} GiB (counted "
            "twice while loading); set CacheConfig.memory_bytes or num_blocks")
    # Every seat at full length four times over (the rest is prefix cache): a small model
    # would otherwise get millions of blocks, each a Python object in the block pool.
    max_len = min(sched.max_model_len or model.max_position_embeddings, MAX_POSITIONS_CAP)
    cap = 4 * sched.max_num_seqs * cdiv(max_len, cache.block_size) + 1
    return min(pool // per_block, cap)
