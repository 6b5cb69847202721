"""CUDA graphs of the decode step's forward pass, one per batch-size bucket.

Why: a decode step of a small model on a GPU is a few hundred kernel launches with
Python around each, milliseconds of host time against well under a millisecond of GPU
work. A graph captured once replays them all in one call.

A graph freezes shapes, addresses and the host values kernels were launched with; this
is how a decode step lives with that:

- shapes: a batch of n decode rows replays the graph of the smallest bucket >= n (up to
  MAX_GRAPH_BATCH rows; a larger batch runs eagerly). Rows n..bucket-1 are padding:
  token 0 at position 0, slot -1 (their K/V is never stored) and KV length 0
  (attention reads nothing for them); their hidden rows are not read.
- addresses: the inputs live in static device buffers the graphs were captured on. A
  step writes its inputs into pinned host staging buffers and copies them over in two
  non-blocking copies (one int64, one int32), then replays.
- host values: attention's split count is chosen for ``max_model_len``, the longest a
  sequence may get, so every batch's lengths fit the captured grid; splits past a
  sequence's end find no tokens.
- the KV cache: captured by address. The ModelRunner captures again when it is given
  another cache tensor (engine.model_runner).

The sampler runs after the replay, eagerly, on the first n rows.

``capture=False`` runs the same static-buffer forward without a graph: what the tests
do on CPU under the Triton interpreter (tests/kernels/test_decode_graphs.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from engine.model import ForwardContext, LlamaModel
from kernels import AttentionMetadata

# Larger decode batches run eagerly: their launches are a small part of the step by
# then, and every bucket is a capture at start-up (one per 8 rows).
MAX_GRAPH_BATCH = 256


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to and including ``max_batch``."""
    small = [b for b in (1, 2, 4) if b < max_batch]
    return small + list(range(8, max_batch, 8)) + [max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,
        block_size: int,
        max_model_len: int,
        max_batch: int,
        *,
        capture: bool,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.buckets = batch_buckets(min(max_batch, MAX_GRAPH_BATCH))
        self.max_batch = self.buckets[-1]
        self.max_blocks = -(-max_model_len // block_size)
        dev = kv_cache.device
        b, nb = self.max_batch, self.max_blocks
        pin = dev.type == "cuda"
        # int64 [token ids | positions | slots], int32 [KV lengths | block tables (b, nb)]:
        # one copy each, the int32 one only as far as the batch's table rows reach.
        self._i64 = torch.zeros(3 * b, dtype=torch.long, device=dev)
        self._i32 = torch.zeros(b + b * nb, dtype=torch.int32, device=dev)
        self._host_i64 = torch.zeros(3 * b, dtype=torch.long, pin_memory=pin)
        self._host_i32 = torch.zeros(b + b * nb, dtype=torch.int32, pin_memory=pin)
        self._i64[2 * b:] = -1  # slots: nothing stored until a step says where
        self._query_start = torch.arange(b + 1, dtype=torch.int32, device=dev)
        # The staging buffers are rewritten only once the previous step's copy is done.
        self._copied = torch.cuda.Event() if pin else None
        self._runs: dict[int, Callable[[], torch.Tensor]] = {}
        # One memory pool for every bucket's graph: only one replays at a time.
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        for n in reversed(self.buckets):  # largest first: the rest reuse its memory
            self._runs[n] = self._capture(n) if capture else self._forward_fn(n)

    def bucket(self, n: int) -> int | None:
        """The bucket a batch of ``n`` rows replays, or None when none holds it."""
        return next((b for b in self.buckets if b >= n), None)

    @torch.inference_mode()
    def run(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """Hidden states (n, hidden) of n decode rows: row i is token_ids[i] at
        positions[i], its sequence's KV (its own K/V stored there too) in
        block_tables[i]."""
        n = len(token_ids)
        size = self.bucket(n)
        if size is None or not n:
            raise ValueError(f"a decode batch of {n} rows has no graph (max {self.max_batch})")
        self._stage(n, token_ids, positions, block_tables)
        return self._runs[size]()[:n]

    def _stage(
        self,
        n: int,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> None:
        b, nb, bs = self.max_batch, self.max_blocks, self.block_size
        if self._copied is not None:
            self._copied.synchronize()  # a no-op after any step that read its tokens
        h64 = self._host_i64.numpy()
        h32 = self._host_i32.numpy()
        h64[:n] = token_ids
        h64[b:b + n] = positions
        h64[n:b] = 0
        h64[b + n:2 * b] = 0
        h64[2 * b + n:] = -1  # padding rows store nothing
        h32[n:b] = 0  # padding rows attend to nothing
        for i, (pos, table) in enumerate(zip(positions, block_tables, strict=True)):
            need = pos // bs + 1  # blocks holding positions 0..pos
            if need > nb:
                raise ValueError(f"position {pos} is past max_model_len {self.max_model_len}")
            h32[i] = pos + 1
            h32[b + i * nb:b + i * nb + need] = table[:need]
            h64[2 * b + i] = table[pos // bs] * bs + pos % bs  # its slot
        self._i64.copy_(self._host_i64, non_blocking=True)
        end = b + n * nb
        self._i32[:end].copy_(self._host_i32[:end], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _forward_fn(self, n: int) -> Callable[[], torch.Tensor]:
        """The forward pass of an n-row bucket over the static buffers."""
        b, nb = self.max_batch, self.max_blocks
        meta = AttentionMetadata(
            query_start_loc=self._query_start[:n + 1],
            seq_lens=self._i32[:n],
            block_tables=self._i32[b:b + b * nb].view(b, nb)[:n],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # fixes the split count for every length
            block_size=self.block_size,
            query_lens_host=[1] * n,
            seq_lens_host=[self.max_model_len] * n,
        )
        ctx = ForwardContext(positions=self._i64[b:b + n], slot_mapping=self._i64[2 * b:2 * b + n],
                             attn=meta, kv_cache=self.kv_cache)
        ids = self._i64[:n]

        def forward() -> torch.Tensor:
            return self.model(ids, ctx)

        return forward

    def _capture(self, n: int) -> Callable[[], torch.Tensor]:
        forward = self._forward_fn(n)
        # Warm-up off the capture, as torch asks: Triton compiles, cuBLAS makes its
        # handles and workspaces. The static inputs still say "store nothing, attend to
        # nothing", so neither this nor the capture touches the cache.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of the worker's other threads (a transfer backend
        # setting up, say) go on during the capture instead of failing it.
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self._pool,
                                                      capture_error_mode="thread_local"):
            out = forward()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay
