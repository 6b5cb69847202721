"""Attention and KV-cache ops over the paged cache, one call site per op.

Each op dispatches on the tensor's device: CUDA tensors go to the Triton kernels,
everything else to the torch path (ref_*.py), which is also the kernels' reference.
No global flags: the device of the inputs decides. This package imports nothing of the
rest of the project.
"""

from kernels.metadata import AttentionMetadata
from kernels.ops import (
    gather_blocks,
    paged_attention,
    rms_norm,
    rotary,
    rotary_store_kv,
    scatter_blocks,
    silu_and_mul,
    store_kv,
)

__all__ = [
    "AttentionMetadata",
    "gather_blocks",
    "paged_attention",
    "rms_norm",
    "rotary",
    "rotary_store_kv",
    "scatter_blocks",
    "silu_and_mul",
    "store_kv",
]
