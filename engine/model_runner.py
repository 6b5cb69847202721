"""Turns a scheduler step into tensors, runs the model, and samples.

Owns the physical KV cache (one tensor in the layout of engine.kv_layout) and the
model weights. Knows nothing of queues or statuses: it gets chunks and block tables,
returns one sampled token per chunk that samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.config import ModelConfig
from engine.kv_layout import KVLayout
from engine.model import ForwardContext, LlamaModel
from engine.sampler import SampledToken, Sampler, SamplingRow
from engine.scheduler import ScheduledChunk
from kernels import AttentionMetadata


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        layout: KVLayout,
        max_model_len: int,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.device = device
        self.layout = layout
        self.model = LlamaModel.build(model_config, state_dict, max_model_len, device,
                                      layout.dtype)
        self.kv_cache = layout.allocate(device)  # (num_blocks, L, 2, bs, Hkv, D)
        self.sampler = Sampler(seed)

    @torch.inference_mode()
    def execute(
        self, chunks: Sequence[ScheduledChunk], block_tables: Sequence[list[int]]
    ) -> list[SampledToken]:
        """Run one forward pass; returns tokens for the chunks with ``samples`` set, in order."""
        bs = self.layout.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        for chunk, table in zip(chunks, block_tables, strict=True):
            start, n = chunk.start, chunk.num_tokens
            ids += chunk.request.token_ids[start : start + n]
            pos = range(start, start + n)
            positions += pos
            slots += [table[p // bs] * bs + p % bs for p in pos]
            if chunk.samples:
                sample_rows.append(len(ids) - 1)
        meta = AttentionMetadata.build(
            [c.num_tokens for c in chunks],
            [c.start + c.num_tokens for c in chunks],
            [list(t) for t in block_tables],
            bs,
            self.device,
        )
        ctx = ForwardContext(
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            attn=meta,
            kv_cache=self.kv_cache,
        )
        hidden = self.model(torch.tensor(ids, dtype=torch.long, device=self.device), ctx)
        if not sample_rows:
            return []
        logits = self.model.compute_logits(hidden[sample_rows])  # (S, vocab)
        rows = [
            SamplingRow(c.request.params, c.request.prompt_token_ids,
                        c.request.output_token_ids, c.request.generator)
            for c in chunks if c.samples
        ]
        return self.sampler(logits, rows)
