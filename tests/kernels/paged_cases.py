"""Random paged-attention inputs for the kernel tests (shared by the test modules).

Blocks of each sequence are drawn in shuffled order from a multi-layer cross-layer cache,
never block 0 (the null block that pads block tables), and the tested layer is a strided
view ``full[:, layer]`` of it, as in the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kernels.metadata import AttentionMetadata
from kernels.ref_attention import paged_attention_naive, paged_attention_torch

DEVICE = torch.device(os.environ.get("PDSERVE_KERNEL_DEVICE", "cpu"))

# (rtol, atol) per dtype against fp32-maths references.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}


@dataclass
class PagedCase:
    full: torch.Tensor  # (num_blocks, num_layers, 2, block_size, Hkv, D)
    cache: torch.Tensor  # (num_blocks, 2, block_size, Hkv, D), view of one layer
    layer: int
    q: torch.Tensor  # (T, Hq, D)
    meta: AttentionMetadata
    scale: float
    used_slots: list[int]  # every slot that holds a live token, over all sequences
    cpu_meta: AttentionMetadata  # the same step built for CPU tensors (the references)

    def references(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(torch path, naive) outputs, computed on CPU: the naive reference builds its
        masks on the CPU, so it cannot take CUDA tensors."""
        q, cache = self.q.cpu(), self.full.cpu()[:, self.layer]
        return (paged_attention_torch(q, cache, self.cpu_meta, self.scale, native=False),
                paged_attention_naive(q, cache, self.cpu_meta, self.scale))


def make_case(
    query_lens: list[int],
    seq_lens: list[int],
    *,
    hkv: int,
    group: int,
    d: int,
    bs: int,
    dtype: torch.dtype,
    seed: int,
    num_layers: int = 3,
    layer: int = 1,
    spare_blocks: int = 3,
) -> PagedCase:
    gen = torch.Generator().manual_seed(seed)
    counts = [-(-sl // bs) for sl in seq_lens]
    nb = 1 + sum(counts) + spare_blocks
    full = torch.randn((nb, num_layers, 2, bs, hkv, d), generator=gen).to(dtype)
    order = (torch.randperm(nb - 1, generator=gen) + 1).tolist()
    tables, used, i = [], [], 0
    for n, sl in zip(counts, seq_lens, strict=True):
        table = order[i : i + n]
        i += n
        tables.append(table)
        used += [table[p // bs] * bs + p % bs for p in range(sl)]
    # Scores ~ N(0, 4): peakier softmax than plain randn, so a wrong weight shows.
    q = 2.0 * torch.randn((sum(query_lens), hkv * group, d), generator=gen)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, bs, DEVICE)
    cpu_meta = AttentionMetadata.build(query_lens, seq_lens, tables, bs, torch.device("cpu"))
    full = full.to(DEVICE)
    q = q.to(dtype).to(DEVICE)
    return PagedCase(full, full[:, layer], layer, q, meta, d**-0.5, used, cpu_meta)


def random_lengths(
    gen: torch.Generator, n: int, lo: int, hi: int, *, avoid_multiple_of: int = 0
) -> list[int]:
    """n ints in [lo, hi]; with avoid_multiple_of, none is a multiple of it."""
    out = []
    while len(out) < n:
        x = int(torch.randint(lo, hi + 1, (1,), generator=gen))
        if avoid_multiple_of and x % avoid_multiple_of == 0:
            continue
        out.append(x)
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), rtol=rtol, atol=atol)
