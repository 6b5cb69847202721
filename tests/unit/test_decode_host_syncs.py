"""A decode step that replays a CUDA graph reads the GPU once: the sampled tokens.

On a GPU every read of a device tensor from the host (``tolist``, ``item``, ``int()``,
``bool()``, ``.cpu()``...) waits for all queued work, so each one in a decode step is a
stall between steps. This counts those reads with a TorchFunctionMode shim around whole
``LLMEngine.step()`` calls on CPU, the graph replay replaced by a fake forward (the
kernels are not what is counted here; tests/kernels/test_decode_graphs.py runs them),
and the staging buffers' own host tensors left out (they live in host memory on a GPU
too).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu",
         "numpy", "nonzero"}


class CountReads(TorchFunctionMode):
    def __init__(self, host_ptrs: set[int]) -> None:
        super().__init__()
        self.host_ptrs = host_ptrs
        self.reads: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        name = getattr(func, "__name__", "")
        if (name in READS and args and isinstance(args[0], torch.Tensor)
                and args[0].untyped_storage().data_ptr() not in self.host_ptrs):
            self.reads[name] += 1
        return func(*args, **(kwargs or {}))


def _engine() -> LLMEngine:
    cfg = EngineConfig(model="dummy:tiny-llama3", device="cpu",
                       cache=CacheConfig(num_blocks=64, enable_prefix_caching=False),
                       scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=256))
    engine = LLMEngine(cfg, detokenize=False)
    engine.runner.use_graphs = True  # CPU captures nothing: build the static-buffer path
    engine.runner.kv_cache = engine.runner.kv_cache
    graphs = engine.runner.graphs
    assert graphs is not None
    hidden = engine.model_config.hidden_size
    for size in graphs.buckets:  # a replay that launches nothing: only host work remains
        graphs._runs[size] = lambda size=size: torch.randn(size, hidden)
    return engine


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.01, seed=3, max_tokens=6,
                   ignore_eos=True),
], ids=["greedy", "sampled"])
def test_a_graph_decode_step_reads_the_device_once(params: SamplingParams) -> None:
    engine = _engine()
    graphs = engine.runner.graphs
    assert graphs is not None
    for i in range(5):
        engine.add_request([7 + i] * (3 + i), params)
    while any(not r.output_token_ids for r in engine.requests.values()):
        engine.step()  # prefill, eager
    replayed = []
    run = graphs.run
    graphs.run = lambda *a: replayed.append(len(a[0])) or run(*a)  # type: ignore[method-assign]
    host = {graphs._host_i64.untyped_storage().data_ptr(),
            graphs._host_i32.untyped_storage().data_ptr()}
    for _ in range(3):
        with CountReads(host) as shim:
            outs = engine.step()
        assert len(outs) == 5
        assert dict(shim.reads) == {"tolist": 1}, shim.reads
    assert replayed == [5, 5, 5]
