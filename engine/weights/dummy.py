"""Random weights of any ModelConfig, for benchmarks and tests without a checkpoint.

Each tensor is drawn directly on the target device in the target dtype (an 8B model on
a GPU never passes through host memory) from its own generator, seeded by the run's
seed and the tensor's name: the same (seed, device type, dtype) gives the same weights
whatever subset or order is generated. CPU and CUDA generators differ, so to compare
two implementations on a GPU hand both the same state dict.

Scale: matrices and embeddings N(0, 0.02) (HF's initializer_range), biases N(0, 0.02),
norm weights N(1, 0.02): near 1 keeps activations sane, and not exactly 1 makes a
swapped or misnamed norm visible in a comparison test.
"""

from __future__ import annotations

import zlib

import torch

from engine.config import ModelConfig
from engine.weights.names import param_shapes

INIT_STD = 0.02
NORM_STD = 0.02


def dummy_state_dict(config: ModelConfig, dtype: torch.dtype, device: torch.device,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random tensors for ``config`` (``meta`` device: shapes only)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    sd: dict[str, torch.Tensor] = {}
    for name, shape in param_shapes(config).items():
        t = torch.empty(shape, dtype=dtype, device=device)
        if device.type != "meta":
            g = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
            mean = 1.0 if name.endswith("norm.weight") else 0.0
            t.normal_(mean, NORM_STD if mean else INIT_STD, generator=g)
        sd[name] = t
    return sd


def _tensor_seed(seed: int, name: str) -> int:
    # crc32 is stable across processes (str hash is salted per process).
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)
