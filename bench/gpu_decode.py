"""Step d: how far a decode step of an 8B-shaped model is from the memory roofline.

One engine (``dummy:llama-3-8b``, bf16, 512-token prompts) decodes at batch 1, 8 and 64.
Per batch, after prefill and three warm-up steps:

- ``step_ms``: the median wall time of ``LLMEngine.step()`` (synchronized): what a
  decode worker's token costs, host work (scheduling, metadata, sampling) included,
  with the engine's CUDA graphs (engine/decode_graphs.py) as it serves;
- ``step_ms_eager``: the same steps with the graphs turned off (``--no-cuda-graphs``);
- ``roofline_ms``: (weight bytes + the batch's KV bytes) / the copy bandwidth measured
  in this step -- no decode step can read its weights and KV faster;
- ``forward_eager_ms`` / ``forward_graph_ms``: the model's forward alone on the same
  batch, launched eagerly and replayed from the engine's graph for the batch;
- ``host_syncs_per_step``: synchronizing calls in one step, counted by torch's sync
  debug mode (each is a stall of the host on the GPU);
- ``triton_cache_new_entries``: kernels compiled during the timed steps (recompiles
  while serving: should be 0 after warm-up).
"""

from __future__ import annotations

import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from bench.gpu_common import StepContext, copy_bandwidth, median_ms
from bench.gpu_plan import NUM, OPT_NUM, OPT_STR

_BATCH = {"batch": NUM, "context": NUM, "step_ms": NUM, "step_ms_p90": NUM,
          "step_ms_eager": NUM, "graph_buckets": OPT_NUM,
          "roofline_ms": NUM, "fraction_of_roofline": NUM, "weights_bytes": NUM,
          "kv_bytes": NUM, "forward_eager_ms": OPT_NUM, "forward_graph_ms": OPT_NUM,
          "graph_error": OPT_STR, "host_syncs_per_step": OPT_NUM,
          "triton_cache_new_entries": OPT_NUM}
SCHEMA: dict[str, Any] = {"model": str, "dtype": str, "prompt_tokens": NUM,
                          "copy_gb_per_s": NUM, "engine_build_s": NUM, "batches": [_BATCH]}
FAKE: dict[str, Any] = {
    "model": "dummy:llama-3-8b", "dtype": "bfloat16", "prompt_tokens": 512,
    "copy_gb_per_s": 4300.0, "engine_build_s": 14.0,
    "batches": [{"batch": 1, "context": 520, "step_ms": 21.0, "step_ms_p90": 23.0,
                 "step_ms_eager": 30.0, "graph_buckets": 11,
                 "roofline_ms": 3.7, "fraction_of_roofline": 0.18, "weights_bytes": 16e9,
                 "kv_bytes": 68e6, "forward_eager_ms": 12.0, "forward_graph_ms": 4.6,
                 "graph_error": None, "host_syncs_per_step": 3, "triton_cache_new_entries": 0}],
}


def headline(r: dict[str, Any]) -> dict[str, Any]:
    return {f"b{b['batch']}_fraction_of_roofline": b["fraction_of_roofline"]
            for b in r["batches"]} | {
        f"b{b['batch']}_step_ms": b["step_ms"] for b in r["batches"]} | {
        f"b{b['batch']}_eager_over_graphs": b["step_ms_eager"] / b["step_ms"]
        for b in r["batches"]}


def _cache_entries() -> int | None:
    d = os.environ.get("TRITON_CACHE_DIR")
    return sum(1 for _ in Path(d).iterdir()) if d and Path(d).is_dir() else None


def _count_syncs(fn: Any) -> int | None:
    """Synchronizing CUDA calls made by ``fn`` (torch's sync debug mode warns on each)."""
    import torch

    if not torch.cuda.is_available():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _decode_inputs(engine: Any, rids: list[str]) -> tuple[Any, Any, int]:
    """The next decode step's (token ids, ForwardContext) for ``rids``, built as the
    ModelRunner builds them, and the batch's KV tokens."""
    import torch

    from engine.model import ForwardContext
    from kernels import AttentionMetadata

    bs, dev = engine.layout.block_size, engine.device
    ids, pos, slots, lens, tables = [], [], [], [], []
    for rid in rids:
        req, table = engine.requests[rid], list(engine.kv.block_table(rid))
        p = min(req.num_computed_tokens, len(table) * bs - 1)
        ids.append(req.token_ids[p])
        pos.append(p)
        slots.append(table[p // bs] * bs + p % bs)
        lens.append(p + 1)
        tables.append(table)
    meta = AttentionMetadata.build([1] * len(rids), lens, tables, bs, dev)
    ctx = ForwardContext(positions=torch.tensor(pos, device=dev),
                         slot_mapping=torch.tensor(slots, device=dev), attn=meta,
                         kv_cache=engine.kv_cache)
    return torch.tensor(ids, device=dev), ctx, sum(lens)


def _forward_times(engine: Any, rids: list[str], cuda: bool) -> dict[str, Any]:
    import torch

    model = engine.runner.model
    graphs = engine.runner.graphs
    ids, fctx, _ = _decode_inputs(engine, rids)
    out: dict[str, Any] = {"forward_eager_ms": None, "forward_graph_ms": None,
                           "graph_error": None}
    with torch.inference_mode():
        out["forward_eager_ms"] = median_ms(lambda: model(ids, fctx), 5 if not cuda else 20,
                                            2, cuda)
        if graphs is None:
            out["graph_error"] = ("no CUDA graphs on CPU" if not cuda
                                  else engine.runner.graph_error or "no graphs captured")
            return out
        try:
            # The step's rows through the engine's own graph: the same inputs, staged.
            pos = fctx.positions.tolist()
            tables = [list(engine.kv.block_table(r)) for r in rids]
            toks = ids.tolist()
            out["forward_graph_ms"] = median_ms(
                lambda: graphs.run(toks, pos, tables), 20, 3, cuda)
        except Exception as e:  # a replay failure is a finding, not the end of the step
            out["graph_error"] = f"{type(e).__name__}: {e}"[:400]
    return out


def _batch(ctx: StepContext, engine: Any, b: int, prompt: int, steps: int, copy_gbs: float
           ) -> dict[str, Any]:
    import torch

    from engine.sampling_params import SamplingParams

    cuda = ctx.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(b)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=2 * steps + 8, ignore_eos=True)
    rids = [engine.add_request(torch.randint(3, vocab, (prompt,), generator=g).tolist(),
                               params, f"d{b}-{i}") for i in range(b)]
    started: set[str] = set()
    for _ in range(10_000):  # prefill, until every request has its first token
        if len(started) == b:
            break
        started |= {o.request_id for o in engine.step() if o.token_ids}
    else:
        raise RuntimeError(f"batch {b}: prefill did not finish")
    for _ in range(3):
        engine.step()
    before = _cache_entries()

    def timed_steps() -> list[float]:
        times = []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            engine.step()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        return times

    times = timed_steps()
    graphs, engine.runner.graphs = engine.runner.graphs, None  # eager, as --no-cuda-graphs
    try:
        eager = timed_steps()
    finally:
        engine.runner.graphs = graphs
    after = _cache_entries()
    syncs = _count_syncs(engine.step)
    fw = _forward_times(engine, rids, cuda)
    _, _, kv_tokens = _decode_inputs(engine, rids)
    mc = engine.model_config
    item = engine.layout.dtype.itemsize
    weights = mc.num_params() * item
    kv = kv_tokens * mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * item
    roof = (weights + kv) / copy_gbs / 1e6
    step_ms = statistics.median(times)
    for rid in rids:
        engine.abort(rid)
    return {"batch": b, "context": kv_tokens // b, "step_ms": step_ms,
            "step_ms_p90": sorted(times)[int(0.9 * (len(times) - 1))],
            "step_ms_eager": statistics.median(eager),
            "graph_buckets": None if graphs is None else len(graphs.buckets),
            "roofline_ms": roof,
            "fraction_of_roofline": roof / step_ms, "weights_bytes": weights, "kv_bytes": kv,
            **fw, "host_syncs_per_step": syncs,
            "triton_cache_new_entries": None if before is None or after is None
            else after - before}


def run(ctx: StepContext) -> None:
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.llm_engine import LLMEngine

    model = "dummy:tiny-llama3" if ctx.toy else "dummy:llama-3-8b"
    batches, prompt, steps = ((1, 2), 32, 3) if ctx.toy else ((1, 8, 64), 512, 20)
    copy = copy_bandwidth((16 << 20) if ctx.toy else (1 << 30), 5 if ctx.toy else 30,
                          ctx.device)
    per_seq = -(-(prompt + 2 * steps + 16) // 16)
    cfg = EngineConfig(model=model, device=ctx.device,
                       cache=CacheConfig(num_blocks=max(batches) * per_seq + 1,
                                         enable_prefix_caching=False),
                       scheduler=SchedulerConfig(max_num_seqs=max(batches),
                                                 max_num_batched_tokens=4096,
                                                 max_model_len=per_seq * 16))
    t0 = time.perf_counter()
    engine = LLMEngine(cfg, detokenize=False)
    ctx.record("model", model)
    ctx.record("dtype", str(engine.dtype).removeprefix("torch."))
    ctx.record("prompt_tokens", prompt)
    ctx.record("copy_gb_per_s", copy["gb_per_s"])
    ctx.record("engine_build_s", time.perf_counter() - t0)
    rows: list[dict[str, Any]] = []
    for b in batches:
        if not ctx.has_time(6 if ctx.toy else 12):
            break
        rows.append(_batch(ctx, engine, b, prompt, steps, copy["gb_per_s"]))
        ctx.record("batches", rows)
    ctx.check("all_batches_measured", len(rows) == len(batches))
    ctx.check("no_recompiles_while_decoding", all(
        not r["triton_cache_new_entries"] for r in rows))
