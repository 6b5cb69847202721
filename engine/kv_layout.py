"""The one physical KV layout, shared by the model, the kernels and kvtransfer.

Block-major, cross-layer: ``[num_blocks, num_layers, 2, block_size, kv_heads, row]``.
One block (all layers, K and V) is one contiguous region, so shipping a request's KV is
a copy of whole blocks; a layer's view ``cache[:, layer]`` is strided, and the kernels
take strides into account.

``row`` is ``head_dim`` for a cache in the model dtype. A quantized cache (``kv_dtype``
int8 or float8_e4m3fn, see kernels.kv_quant) stores each (token, head) row as head_dim
one-byte values followed by their fp32 scale, ``head_dim + 4`` bytes: the scales are part
of the block, so whatever moves blocks (kvtransfer, gather/scatter, a spill tier) moves
them too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.kv_quant import SCALE_LAYOUT, is_quantized, row_len


@dataclass(frozen=True)
class KVLayout:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # the model's (activations, attention maths)
    kv_dtype: torch.dtype | None = None  # what the cache stores; None: the model dtype

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.dtype if self.kv_dtype is None else self.kv_dtype

    @property
    def quantized(self) -> bool:
        return is_quantized(self.storage_dtype)

    @property
    def scale_layout(self) -> str:
        """How scales are stored ("" for an unquantized cache); part of KVSpec."""
        return SCALE_LAYOUT if self.quantized else ""

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads,
                row_len(self.head_dim, self.storage_dtype))

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block: (num_layers, 2, block_size, kv_heads, row)."""
        return self.shape[1:]

    @property
    def bytes_per_block(self) -> int:
        return block_bytes(self.num_layers, self.block_size, self.num_kv_heads, self.head_dim,
                           self.storage_dtype)

    def allocate(self, device: torch.device | str) -> torch.Tensor:
        # Zeros, not empty: the null block (0) pads block tables and must hold finite values
        # (a quantized zero row has scale 0 and reads back as zeros).
        return torch.zeros(self.shape, dtype=self.storage_dtype, device=device)


def block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                storage_dtype: torch.dtype) -> int:
    """Bytes of one block (all layers, K and V, scales included) -- what pool sizing by a
    memory budget divides by."""
    elem = storage_dtype.itemsize
    return num_layers * 2 * block_size * num_kv_heads * row_len(head_dim, storage_dtype) * elem


def layer_view(cache: torch.Tensor, layer: int) -> torch.Tensor:
    """(num_blocks, 2, block_size, kv_heads, row) strided view of one layer."""
    return cache[:, layer]
