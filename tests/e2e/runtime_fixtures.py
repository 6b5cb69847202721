"""Helpers for runtime tests: a Ray session, a router on a background event loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import ray

from engine.config import CacheConfig, EngineConfig
from engine.sampling_params import SamplingParams
from router.config import RouterConfig
from router.core import Router
from router.request_state import Delta, Final

T = TypeVar("T")
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

CHATS = [
    "What is the capital of France?", "Write a haiku about rain.", "Name three colors.",
    "What is 2 + 2?", "Tell me a fun fact about cats.", "Say hello in Spanish.",
    "What is the boiling point of water?", "List two planets.", "Who wrote Hamlet?",
    "Give me a synonym for happy.", "What is photosynthesis?", "Describe the moon.",
    "How many legs does a spider have?", "What color is the sky?", "Name a fruit.",
    "What is the opposite of cold?",
]


def ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, object_store_memory=300 * 1024 * 1024,
                 ignore_reinit_error=True, log_to_driver=False)


def router_config(**kw: Any) -> RouterConfig:
    blocks = kw.pop("num_blocks", None)
    cache = CacheConfig(num_blocks=blocks) if blocks else CacheConfig(memory_bytes=128 << 20)
    return RouterConfig(engine=EngineConfig(cache=cache), **kw)


class LoopThread:
    """An asyncio loop on a thread, so a router outlives one test's coroutine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


class RouterHarness:
    def __init__(self, config: RouterConfig) -> None:
        ensure_ray()
        self.lt = LoopThread()
        self.router = Router(config)
        self.lt.run(self.router.start())

    def close(self) -> None:
        self.lt.run(self.router.shutdown())
        self.lt.close()

    def prompts(self, n: int = 16) -> list[list[int]]:
        return [self.router.encode_chat([{"role": "user", "content": c}]) for c in CHATS[:n]]

    async def collect(self, prompt: list[int], params: SamplingParams) -> tuple[list[int], Final]:
        toks: list[int] = []
        final = None
        async for item in self.router.generate(prompt, params):
            if isinstance(item, Delta):
                toks += item.token_ids
            else:
                final = item
        assert final is not None
        return toks, final

    def generate_all(self, prompts: list[list[int]], params: SamplingParams
                     ) -> list[tuple[list[int], Final]]:
        async def go() -> list[tuple[list[int], Final]]:
            return list(await asyncio.gather(*(self.collect(p, params) for p in prompts)))

        return self.lt.run(go())

    def pools(self) -> dict[str, dict[str, int]]:
        async def go() -> dict[str, dict[str, int]]:
            hs = [h for h in self.router.workers() if h.alive]
            states = await asyncio.gather(*(h.actor.pool_state.remote() for h in hs))
            return {h.worker_id: s for h, s in zip(hs, states, strict=True)}

        return self.lt.run(go())

    def wait_clean(self, timeout: float = 30) -> dict[str, dict[str, int]]:
        """Poll until no worker holds a block or a request (aborts are asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            pools = self.pools()
            if all(is_clean(s) for s in pools.values()) or time.monotonic() > deadline:
                return pools
            time.sleep(0.2)


def is_clean(s: dict[str, int]) -> bool:
    """Every block free or cached (owned by nobody), no request, the books balanced."""
    return (s["used"] == 0 and s["requests"] == 0 and s["held"] == 0
            and s["blocks_running"] == s["blocks_reserved"] == s["blocks_transfer"] == 0
            and s["blocks_free"] + s["blocks_cached"] == s["usable"]
            and s["violations"] == 0)


def assert_clean(h: RouterHarness) -> None:
    pools = h.wait_clean()
    for wid, s in pools.items():
        assert is_clean(s), (wid, s)
