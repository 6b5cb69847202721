"""Turns a scheduler step into tensors, runs the model, and samples.

Owns the physical KV cache (one tensor in the layout of engine.kv_layout) and the
model weights. Knows nothing of queues or statuses: it gets chunks and block tables,
returns one sampled token per chunk that samples.

On a GPU a step of decode rows only (every chunk one token that samples) replays a
CUDA graph (engine.decode_graphs); any other step runs eagerly. Before the engine
takes requests, the Triton kernels an eager step can launch are compiled
(engine.kernel_warmup) and the graphs captured, so nothing compiles while serving.
Graphs that fail to capture or to replay are turned off (logged, ``graph_error``) and
every step runs eagerly: the same tokens, only slower.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from engine.config import ModelConfig
from engine.decode_graphs import DecodeGraphs
from engine.kernel_warmup import warm_up_kernels
from engine.kv_layout import KVLayout
from engine.model import ForwardContext, LlamaModel
from engine.sampler import SampledToken, Sampler, SamplingRow
from engine.scheduler import ScheduledChunk
from kernels import AttentionMetadata

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model_config: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        layout: KVLayout,
        max_model_len: int,
        device: torch.device,
        seed: int = 0,
        *,
        max_batch: int = 64,
        cuda_graphs: bool = True,
    ) -> None:
        self.device = device
        self.layout = layout
        self.max_model_len = max_model_len
        self.max_batch = max_batch
        self.model = LlamaModel.build(model_config, state_dict, max_model_len, device,
                                      layout.dtype)
        self.sampler = Sampler(seed)
        self.use_graphs = cuda_graphs and device.type == "cuda"
        self.graphs: DecodeGraphs | None = None
        self.graph_error: str | None = None  # why the graphs were turned off, if they were
        cache = layout.allocate(device)  # (num_blocks, L, 2, bs, Hkv, D)
        if device.type == "cuda":
            warm_up_kernels(self.model, cache, layout.block_size, max_model_len)
        self.kv_cache = cache

    @property
    def kv_cache(self) -> torch.Tensor:
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, cache: torch.Tensor) -> None:
        """Run on ``cache``; the graphs are captured (again) on it: they hold its address."""
        self._kv_cache = cache
        self.graphs = None  # never replay a graph over a cache that may be freed
        if not self.use_graphs:
            return
        try:
            self.graphs = DecodeGraphs(self.model, cache, self.layout.block_size,
                                       self.max_model_len, self.max_batch,
                                       capture=self.device.type == "cuda")
        except Exception as e:
            self._drop_graphs("capturing them", e)

    def _drop_graphs(self, doing: str, e: Exception) -> None:
        """Eager steps make the same tokens, only slower: graphs that cannot be captured
        or replayed (a library or driver that does not support it) must not keep the
        worker from serving."""
        self.graphs = None
        self.graph_error = f"{doing}: {type(e).__name__}: {e}"
        log.error("decode CUDA graphs off, every step runs eagerly (%s)", self.graph_error,
                  exc_info=e)

    @torch.inference_mode()
    def execute(
        self, chunks: Sequence[ScheduledChunk], block_tables: Sequence[list[int]]
    ) -> list[SampledToken]:
        """Run one forward pass; returns tokens for the chunks with ``samples`` set, in order."""
        hidden = self._replay(chunks, block_tables) if self._graphs_fit(chunks) else None
        if hidden is not None:
            return self._sample(chunks, hidden)
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
        return self._sample(chunks, hidden[sample_rows])

    def _graphs_fit(self, chunks: Sequence[ScheduledChunk]) -> bool:
        return (self.graphs is not None and 0 < len(chunks) <= self.graphs.max_batch
                and all(c.num_tokens == 1 and c.samples and c.start < self.max_model_len
                        for c in chunks))

    def _replay(
        self, chunks: Sequence[ScheduledChunk], block_tables: Sequence[list[int]]
    ) -> torch.Tensor | None:
        """The decode rows' hidden states from their graph; None (and the graphs off)
        if the replay fails: nothing in it depends on one request (_graphs_fit checked
        the rows), so a failure is the graphs' own and the step runs eagerly."""
        assert self.graphs is not None
        try:
            return self.graphs.run([c.request.token_ids[c.start] for c in chunks],
                                   [c.start for c in chunks], block_tables)
        except Exception as e:
            self._drop_graphs("replaying them", e)
            return None

    def _sample(self, chunks: Sequence[ScheduledChunk], hidden: torch.Tensor
                ) -> list[SampledToken]:
        """Tokens of the sampling chunks from their rows of ``hidden``, in order."""
        logits = self.model.compute_logits(hidden)  # (S, vocab)
        rows = [
            SamplingRow(c.request.params, c.request.prompt_token_ids,
                        c.request.penalized_output_token_ids, c.request.generator)
            for c in chunks if c.samples
        ]
        return self.sampler(logits, rows)
