"""The one physical KV layout, shared by the model, the kernels and kvtransfer.

Block-major, cross-layer: ``[num_blocks, num_layers, 2, block_size, kv_heads, head_dim]``.
One block (all layers, K and V) is one contiguous region, so shipping a request's KV is
a copy of whole blocks; a layer's view ``cache[:, layer]`` is strided, and the kernels
take strides into account.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_blocks, self.num_layers, 2, self.block_size, self.num_kv_heads,
                self.head_dim)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block: (num_layers, 2, block_size, kv_heads, head_dim)."""
        return self.shape[1:]

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        n = self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
        return n * elem

    def allocate(self, device: torch.device | str) -> torch.Tensor:
        # Zeros, not empty: the null block (0) pads block tables and must hold finite values.
        return torch.zeros(self.shape, dtype=self.dtype, device=device)


def layer_view(cache: torch.Tensor, layer: int) -> torch.Tensor:
    """(num_blocks, 2, block_size, kv_heads, head_dim) strided view of one layer."""
    return cache[:, layer]
