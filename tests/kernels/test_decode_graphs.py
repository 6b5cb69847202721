"""The decode step's CUDA graphs (engine/decode_graphs.py): padding rows store nothing,
stale staging rows never leak into a later step, and an engine that replays graphs
generates exactly what an eager one does.

On a GPU the graphs are captured and replayed for real; on CPU the same static-buffer
forward runs under the Triton interpreter (``capture=False``), with every op sent to
the Triton kernels, as a GPU would run them.
"""

from __future__ import annotations

import pytest
import torch
from paged_cases import DEVICE

import kernels.cpu_native
import kernels.ops
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.decode_graphs import DecodeGraphs, batch_buckets
from engine.llm_engine import LLMEngine
from engine.model import ForwardContext, LlamaModel
from engine.presets import get_preset
from engine.sampling_params import SamplingParams
from engine.weights.dummy import dummy_state_dict
from kernels import AttentionMetadata

BS = 16
CAPTURE = DEVICE.type == "cuda"


@pytest.fixture(autouse=True)
def _triton_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU, run every op through the (interpreted) Triton kernels, as a GPU does."""
    if DEVICE.type == "cpu":
        monkeypatch.setattr(kernels.ops, "_use_triton", lambda t: True)
        monkeypatch.setattr(kernels.cpu_native, "supports_rotary_store", lambda *a: False)


def test_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]


def _model(max_len: int) -> LlamaModel:
    cfg = get_preset("tiny-llama3")
    sd = dummy_state_dict(cfg, torch.float32, DEVICE, seed=3)
    return LlamaModel.build(cfg, sd, max_len, DEVICE, torch.float32)


def _eager(model: LlamaModel, cache: torch.Tensor, rows: list[tuple[int, int, list[int]]]
           ) -> torch.Tensor:
    """The eager forward of decode rows (token, position, block table)."""
    slots = [t[p // BS] * BS + p % BS for _, p, t in rows]
    meta = AttentionMetadata.build([1] * len(rows), [p + 1 for _, p, _ in rows],
                                   [t for _, _, t in rows], BS, DEVICE)
    ctx = ForwardContext(positions=torch.tensor([p for _, p, _ in rows], device=DEVICE),
                         slot_mapping=torch.tensor(slots, device=DEVICE), attn=meta,
                         kv_cache=cache)
    with torch.inference_mode():
        return model(torch.tensor([tok for tok, _, _ in rows], device=DEVICE), ctx)


def test_padding_stores_nothing_and_stale_rows_never_leak() -> None:
    """Random (never zero) KV in every block; steps of 4, 2, 3 and 1 rows (buckets 4, 2,
    4, 1): after each, the cache equals the eager step's -- the rows' own slots hold
    the same K/V, every other slot is untouched -- and so do the hidden states. The
    3-row step pads bucket 4 over a row the 4-row step staged for real."""
    max_len = 1024  # four splits of 256 tokens for one row: most of them empty here
    model = _model(max_len)
    cfg = model.config
    gen = torch.Generator().manual_seed(5)
    num_blocks = 40
    cache = torch.randn((num_blocks, cfg.num_hidden_layers, 2, BS, cfg.num_key_value_heads,
                         cfg.head_dim), generator=gen).to(DEVICE)
    graphs = DecodeGraphs(model, cache, BS, max_len, 5, capture=CAPTURE)
    assert graphs.buckets == [1, 2, 4, 5]
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = [order[i * 6:(i + 1) * 6] for i in range(4)]  # 96 tokens each at most
    steps = [[(11, 40, 0), (12, 17, 1), (13, 0, 2), (14, 95, 3)],  # (token, pos, seq)
             [(21, 41, 0), (22, 18, 1)],
             [(31, 42, 0), (32, 19, 1), (33, 1, 2)],
             [(41, 16, 3)]]  # a first token in the sequence's second block
    for step in steps:
        rows = [(tok, pos, tables[s]) for tok, pos, s in step]
        want_cache = cache.clone()
        want = _eager(model, want_cache, rows)
        got = graphs.run([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        written = [t[p // BS] * BS + p % BS for _, p, t in rows]
        flat = cache.permute(0, 3, 1, 2, 4, 5).reshape(num_blocks * BS, -1)
        flat_want = want_cache.permute(0, 3, 1, 2, 4, 5).reshape(num_blocks * BS, -1)
        others = torch.ones(num_blocks * BS, dtype=torch.bool)
        others[written] = False
        others = others.to(DEVICE)
        assert torch.equal(flat[others], flat_want[others]), "a padding row stored K/V"
        torch.testing.assert_close(flat[written], flat_want[written], rtol=1e-5, atol=1e-5)
        cache.copy_(want_cache)  # the next step starts from the same state on both sides


def test_past_max_model_len_is_refused() -> None:
    model = _model(64)
    cache = torch.zeros((8, 2, 2, BS, 2, 16), device=DEVICE)
    graphs = DecodeGraphs(model, cache, BS, 64, 2, capture=CAPTURE)
    with pytest.raises(ValueError, match="past max_model_len"):
        graphs.run([1], [64], [[1, 2, 3, 4, 5]])
    with pytest.raises(ValueError, match="no graph"):
        graphs.run([1, 2, 3], [0, 0, 0], [[1], [2], [3]])


def _engine(graphs: bool) -> LLMEngine:
    cfg = EngineConfig(model="dummy:tiny-llama3", dtype="float32", device=DEVICE.type,
                       cuda_graphs=graphs,
                       cache=CacheConfig(num_blocks=64, enable_prefix_caching=False),
                       scheduler=SchedulerConfig(max_num_seqs=5, max_model_len=256))
    engine = LLMEngine(cfg, detokenize=False)
    if graphs and DEVICE.type == "cpu":  # the runner only captures on CUDA: ask anyway
        engine.runner.use_graphs = True
        engine.runner.kv_cache = engine.runner.kv_cache
    assert (engine.runner.graphs is not None) == graphs
    return engine


def test_engine_with_graphs_generates_what_eager_does(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """Five requests of different lengths and budgets, so decode batches shrink as they
    finish (5, 4, ... 1 rows): greedy and seeded sampling, token for token."""
    prompts = [[5 + i for i in range(n)] for n in (3, 20, 9, 33, 1)]
    budgets = [6, 9, 3, 12, 7]
    params = [SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=m,
                             ignore_eos=True) for i, m in enumerate(budgets)]
    replays: list[int] = []
    run = DecodeGraphs.run

    def counting(self: DecodeGraphs, *args: object) -> torch.Tensor:
        replays.append(len(args[0]))  # type: ignore[arg-type]
        return run(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(DecodeGraphs, "run", counting)
    outputs = []
    for graphs in (False, True):
        engine = _engine(graphs)
        rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        tokens: dict[str, list[int]] = {r: [] for r in rids}
        while engine.has_unfinished():
            for o in engine.step():
                tokens[o.request_id] += o.new_token_ids
        outputs.append([tokens[r] for r in rids])
        assert engine.pool.num_free_blocks == engine.pool.num_usable_blocks
    assert outputs[0] == outputs[1]
    assert [len(t) for t in outputs[1]] == budgets
    assert len(set(replays)) >= 3, f"decode batches replayed: {replays}"


def test_a_new_cache_tensor_gets_graphs_of_its_own() -> None:
    """The cuda-ipc decode worker hands its engine an exported cache after start-up:
    graphs captured on the first cache would write into freed memory."""
    engine = _engine(True)
    first = engine.runner.graphs
    exported = torch.zeros_like(engine.kv_cache)
    engine.kv_cache = exported
    assert engine.runner.graphs is not first
    assert engine.runner.graphs is not None and engine.runner.graphs.kv_cache is exported


def _generate(engine: LLMEngine) -> list[list[int]]:
    rids = [engine.add_request([9 + i] * (4 + 3 * i),
                               SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
            for i in range(3)]
    tokens: dict[str, list[int]] = {r: [] for r in rids}
    while engine.has_unfinished():
        for o in engine.step():
            tokens[o.request_id] += o.new_token_ids
    return [tokens[r] for r in rids]


@pytest.mark.parametrize("when", ["capture", "replay"])
def test_graphs_that_fail_turn_off_and_steps_run_eagerly(
        when: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A capture or a replay that raises (a library that cannot be captured, say) must
    not fail a request or keep the worker from serving: the graphs go, steps run eagerly."""
    want = _generate(_engine(False))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"simulated {when} failure")

    if when == "capture":
        monkeypatch.setattr(DecodeGraphs, "__init__", broken)
        engine = LLMEngine(_engine(False).config, detokenize=False)
        engine.runner.use_graphs = True
        engine.runner.kv_cache = engine.runner.kv_cache
    else:
        engine = _engine(True)
        monkeypatch.setattr(DecodeGraphs, "run", broken)
    assert _generate(engine) == want
    assert engine.pool.num_free_blocks == engine.pool.num_usable_blocks
    assert engine.runner.graphs is None
    assert engine.runner.graph_error is not None and "simulated" in engine.runner.graph_error


def test_buckets_stop_at_the_largest_graph_batch() -> None:
    """A huge max_num_seqs does not mean hundreds of captures: past MAX_GRAPH_BATCH rows
    a decode step runs eagerly (ModelRunner._graphs_fit)."""
    from engine.decode_graphs import MAX_GRAPH_BATCH

    model = _model(64)
    cache = torch.zeros((4, 2, 2, BS, 2, 16), device=DEVICE)
    graphs = DecodeGraphs(model, cache, BS, 64, 10 * MAX_GRAPH_BATCH, capture=False)
    assert graphs.max_batch == MAX_GRAPH_BATCH == graphs.buckets[-1]
    assert graphs.bucket(MAX_GRAPH_BATCH + 1) is None
