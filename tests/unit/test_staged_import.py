"""Staged KV import (decode_worker/staged_import.py): the KV lands between steps in
slices while other requests keep decoding, the imported request continues exactly as
if it had been prefilled in place, and an abort in the middle returns every block."""

from __future__ import annotations

import functools
import threading

import torch

from decode_worker.staged_import import StagedImport, StagedImports
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine_loop import EngineLoop
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kernels import gather_blocks

CFG = EngineConfig(model="dummy:tiny-llama3", cache=CacheConfig(block_size=4, num_blocks=65),
                   scheduler=SchedulerConfig(max_num_batched_tokens=64))
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPT = list(range(10, 42))  # 32 tokens: 8 blocks
OTHER = list(range(100, 108))


@functools.cache
def prefilled_kv(prompt: tuple[int, ...]) -> tuple[int, torch.Tensor, list[int]]:
    """Prefill on an engine of its own (the prefill worker): first token, the prompt's
    KV as a transfer's staging buffer, and the reference tokens of the whole request."""
    p = LLMEngine(CFG, detokenize=False)
    p.add_request(list(prompt), GREEDY, "r", hold_blocks=True)
    first = None
    while p.has_unfinished():
        for o in p.step():
            first = o.new_token_ids[0] if first is None else first
    assert first is not None
    staging = gather_blocks(p.kv_cache, torch.tensor(p.held_blocks("r"))).clone()
    ref = LLMEngine(CFG, detokenize=False)
    ref.add_request(list(prompt), GREEDY, "ref")
    tokens: list[int] = []
    while ref.has_unfinished():
        for o in ref.step():
            tokens += o.new_token_ids
    return first, staging, tokens


def staged(engine: LLMEngine, rid: str, prompt: list[int], first: int,
           staging: torch.Tensor) -> StagedImport:
    blocks = engine.reserve(prompt, GREEDY, rid)
    assert blocks is not None

    def join(e: LLMEngine) -> RequestOutput | None:
        return e.start_prefilled(rid, first)

    return StagedImport(rid, blocks, staging, join)


def test_a_staged_import_lands_in_slices_between_steps_and_decodes_like_a_local_prefill(
) -> None:
    first, staging, want = prefilled_kv(tuple(PROMPT))
    d = LLMEngine(CFG, detokenize=False)
    d.add_request(OTHER, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), "o")
    other_tokens = len(d.step()[0].new_token_ids)  # running: the engine is busy
    imports = StagedImports()
    done = imports.add(staged(d, "r", PROMPT, first, staging))
    got = [first]
    while d.has_unfinished() or imports.pending():
        if imports.pending():
            imports.run(d)
        for o in d.step():
            if o.request_id == "r":
                got += o.new_token_ids
            else:
                other_tokens += len(o.new_token_ids)
    assert done.result(timeout=0) is None  # joined; the first token did not end it
    assert imports.slices > 1  # busy: never the whole import in one go
    assert got == want
    assert other_tokens == 40
    d.audit()
    assert d.pool_state()["used"] == 0


def test_an_abort_during_a_staged_import_returns_its_blocks() -> None:
    first, staging, _ = prefilled_kv(tuple(PROMPT))
    d = LLMEngine(CFG, detokenize=False)
    d.add_request(OTHER, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), "o")
    d.step()
    imports = StagedImports(share=0.0)  # one block per slice
    imp = staged(d, "r", PROMPT, first, staging)
    done = imports.add(imp)
    imports.run(d)
    d.step()
    imports.run(d)
    assert 0 < imp.landed < len(imp.block_ids)
    assert d.pool_state()["blocks_reserved"] == len(imp.block_ids)
    assert d.abort("r") is not None  # the worker's abort command, between two steps
    d.step()
    imports.run(d)  # sees the abort: drops the import
    assert done.result(timeout=0) is False
    assert not imports.pending()
    state = d.pool_state()
    assert state["blocks_reserved"] == 0 and state["violations"] == 0
    d.audit()
    while d.has_unfinished():
        d.step()
    assert d.pool_state()["used"] == 0


def test_the_engine_loop_runs_an_import_that_arrives_while_it_is_idle() -> None:
    first, staging, _ = prefilled_kv(tuple(PROMPT))
    d = LLMEngine(CFG, detokenize=False)
    outs: list[RequestOutput] = []
    finished = threading.Event()

    def on_outputs(batch: list[RequestOutput]) -> None:
        outs.extend(batch)
        if any(o.finished for o in batch):
            finished.set()

    loop = EngineLoop(d, on_outputs)
    imports = StagedImports()
    loop.between_steps = imports
    loop.start()
    try:
        imp = loop.call(lambda e: staged(e, "r", PROMPT, first, staging)).result(timeout=30)
        loop.call(lambda _e: imports.add(imp)).result(timeout=30)
        assert imp.done.result(timeout=30) is None
        assert finished.wait(timeout=30)
    finally:
        loop.stop()
    assert imports.slices == 1  # nothing else running: the whole import at once
    assert sum(len(o.new_token_ids) for o in outs) == GREEDY.max_tokens - 1
    d.audit()
    assert d.pool_state()["used"] == 0
