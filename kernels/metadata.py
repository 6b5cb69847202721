"""Per-step attention metadata, built once per forward pass and shared by every layer.

A step's queries are the scheduled tokens of B sequences laid end to end
(sequence-major). Sequence b owns query rows ``query_start_loc[b]:query_start_loc[b+1]``
and, after the new K/V are stored, ``seq_lens[b]`` tokens of KV in the blocks listed in
``block_tables[b]``. Its queries are the *last* ``query_len`` positions of the sequence:

    KV positions:  0 ........................ seq_len-1
                   |-- cached prefix --|-- this step's queries --|
    query i (0-based in the chunk) sits at position seq_len - query_len + i and attends
    causally to positions 0..that position.

Decode is the case query_len == 1; chunked prefill on top of a cached prefix is
query_len > 1 with seq_len > query_len.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@dataclass
class CpuPlan:
    """Gather indices for the torch path, computed once per step (not per layer)."""

    # Decode rows (query_len == 1), batched into one SDPA call.
    decode_rows: torch.Tensor  # (Bd,) int64 query-row index of each decode sequence
    decode_block_tables: torch.Tensor  # (Bd, max_blocks_d) int64
    decode_mask: torch.Tensor  # (Bd, 1, 1, max_blocks_d * block_size) bool, True = attend
    # Prefill sequences (query_len > 1), one SDPA call each:
    # (first query row, query_len, block ids (n,) int64, seq_len, causal mask or None)
    prefills: list[tuple[int, int, torch.Tensor, int, torch.Tensor | None]] = field(
        default_factory=list
    )


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # (B+1,) int32, cumulative query lengths
    seq_lens: torch.Tensor  # (B,) int32, KV length per sequence including this step's tokens
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with 0 (the null block)
    max_query_len: int
    max_seq_len: int
    block_size: int
    query_lens_host: list[int]
    seq_lens_host: list[int]
    cpu_plan: CpuPlan | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @functools.cached_property
    def host_int32(self) -> bool:
        """Whether the tensors are int32 CPU tensors with unit last strides, as the native
        CPU kernel reads them (asked once per layer, computed once per step)."""
        return all(t.dtype is torch.int32 and t.is_cpu and t.stride(-1) == 1
                   for t in (self.query_start_loc, self.seq_lens, self.block_tables))

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        if not (len(query_lens) == len(seq_lens) == len(block_tables)):
            raise ValueError("query_lens, seq_lens and block_tables must have one entry per seq")
        for ql, sl, bt in zip(query_lens, seq_lens, block_tables, strict=True):
            if ql <= 0 or sl < ql:
                raise ValueError(f"bad lengths: query_len={ql} seq_len={sl}")
            if len(bt) * block_size < sl:
                raise ValueError(f"block table of {len(bt)} blocks cannot hold {sl} tokens")
        max_blocks = max((len(bt) for bt in block_tables), default=1)
        padded = [bt + [0] * (max_blocks - len(bt)) for bt in block_tables]
        starts = [0]
        for ql in query_lens:
            starts.append(starts[-1] + ql)
        meta = cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            block_size=block_size,
            query_lens_host=list(query_lens),
            seq_lens_host=list(seq_lens),
        )
        if device.type != "cuda":
            meta.cpu_plan = _plan_cpu(starts, query_lens, seq_lens, block_tables, block_size)
        return meta


def _plan_cpu(
    starts: list[int],
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
) -> CpuPlan:
    dec = [b for b, ql in enumerate(query_lens) if ql == 1]
    nb = max((-(-seq_lens[b] // block_size) for b in dec), default=1)
    dec_bt = [block_tables[b][:nb] + [0] * (nb - len(block_tables[b][:nb])) for b in dec]
    lens = torch.tensor([seq_lens[b] for b in dec], dtype=torch.int64)
    mask = torch.arange(nb * block_size).unsqueeze(0) < lens.unsqueeze(1)  # (Bd, Lk)
    plan = CpuPlan(
        decode_rows=torch.tensor([starts[b] for b in dec], dtype=torch.int64),
        decode_block_tables=torch.tensor(dec_bt, dtype=torch.int64).reshape(len(dec), nb),
        decode_mask=mask[:, None, None, :],
    )
    for b, ql in enumerate(query_lens):
        if ql == 1:
            continue
        sl = seq_lens[b]
        n = -(-sl // block_size)
        causal = None
        if sl != ql:  # a cached prefix: queries are shifted by sl - ql positions
            qpos = torch.arange(sl - ql, sl).unsqueeze(1)
            causal = torch.arange(sl).unsqueeze(0) <= qpos  # (ql, sl)
        ids = torch.tensor(block_tables[b][:n], dtype=torch.int64)
        plan.prefills.append((starts[b], ql, ids, sl, causal))
    return plan
