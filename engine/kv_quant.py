"""Which dtype an engine's KV cache stores: CacheConfig.kv_cache_dtype resolved on a device.

``auto`` keeps the model dtype; ``int8`` works on CPU and CUDA; ``fp8`` (e4m3) needs a
CUDA device with fp8 support (compute capability 8.9+: Ada, Hopper and later). The row
format (values + fp32 scale per token and head) is kernels.kv_quant's.
"""

from __future__ import annotations

import torch

from engine.config import CacheConfig, ConfigError, ModelConfig
from engine.kv_layout import block_bytes

FP8_MIN_CAPABILITY = (8, 9)


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype,
                     device: torch.device) -> torch.dtype | None:
    """The cache's storage dtype (None: the model dtype); ConfigError where it cannot run."""
    if kv_cache_dtype == "auto":
        return None
    if kv_cache_dtype == "int8":
        return torch.int8
    if kv_cache_dtype == "fp8":
        if device.type != "cuda":
            raise ConfigError(f"--kv-cache-dtype fp8 needs a CUDA GPU with fp8 support "
                              f"(compute capability 8.9+); this engine runs on {device.type}: "
                              "use int8 there")
        cap = torch.cuda.get_device_capability(device)
        if cap < FP8_MIN_CAPABILITY:
            raise ConfigError(f"--kv-cache-dtype fp8 needs compute capability 8.9+ (Ada, "
                              f"Hopper), this GPU has {cap[0]}.{cap[1]}: use int8")
        return torch.float8_e4m3fn
    raise ConfigError(f"unknown kv_cache_dtype {kv_cache_dtype!r}")


def kv_block_bytes(model: ModelConfig, cache: CacheConfig, model_dtype: torch.dtype,
                   device: torch.device | None) -> int:
    """Bytes of one KV block of this model and cache config (scales included): what pool
    sizing by a memory budget divides by."""
    kv = resolve_kv_dtype(cache.kv_cache_dtype, model_dtype, device or torch.device("cpu"))
    return block_bytes(model.num_hidden_layers, cache.block_size, model.num_key_value_heads,
                       model.head_dim, kv or model_dtype)
