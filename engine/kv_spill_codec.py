"""How the spill tier (engine.kv_spill) stores a block in host memory.

``same``: the pool's block as it is, copied to the host: lossless; a quantized pool's
rows keep their scales (kernels.kv_quant), so an int8 pool spills int8 for free.

``int8``: a float pool's block as int8 rows with one fp32 scale per (layer, K/V, token,
head) -- the same row format as an int8 KV cache (kernels.kv_quant): D + 4 bytes per
row instead of 4 D, 3.76x smaller than fp32 at head_dim 64 (1.9x than bf16). Lossy, by
at most half a quantization step per value (absmax / 254 of its row); restored blocks
are dequantized back into the pool's dtype.

``auto`` (resolve_spill_dtype): int8 on CPU for a float pool -- host memory is the pool's
own memory there, so the tier must be smaller to be worth it -- and ``same`` on GPUs
(host RAM is plentiful next to HBM, and restores should be exact) or for a quantized pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.kv_quant import dequantize, is_quantized, quantize


def resolve_spill_dtype(spill_dtype: str, storage_dtype: torch.dtype,
                        device: torch.device) -> str:
    """CacheConfig.spill_dtype -> "same" or "int8" for a pool of ``storage_dtype``."""
    if is_quantized(storage_dtype):
        return "same"  # already one byte a value, scales included
    if spill_dtype == "auto":
        return "int8" if device.type == "cpu" else "same"
    return spill_dtype


@dataclass(frozen=True)
class SpillCodec:
    """Encodes gathered pool blocks into per-block host tensors and back.

    kind: "same" | "int8". pool_dtype: the pool's storage dtype (what decode returns).
    device: the pool's (what decode returns on).
    """

    kind: str
    pool_dtype: torch.dtype
    device: torch.device

    def encode(self, blocks: torch.Tensor) -> list[torch.Tensor]:
        """(n, *block_shape) pool blocks -> n host tensors, each with its own storage (an
        entry dropped from the tier frees its memory, not a view of a batch)."""
        if self.kind == "int8":
            blocks = quantize(blocks, torch.int8)  # (n, L, 2, bs, H, D + 4)
        host = blocks.to("cpu")
        return [b.clone() for b in host.unbind(0)]

    def decode(self, entries: list[torch.Tensor]) -> torch.Tensor:
        """Host entries -> (n, *block_shape) blocks of the pool's dtype on its device."""
        stacked = torch.stack(entries).to(self.device)
        if self.kind == "int8":
            return dequantize(stacked, self.pool_dtype)
        return stacked

