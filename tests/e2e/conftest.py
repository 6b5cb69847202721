"""Fixtures for the runtime tests (real Ray actors, real model)."""

from __future__ import annotations

import pytest

from engine import LLM
from tests.e2e.runtime_fixtures import CHATS, GREEDY


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="smollm2-135m")


@pytest.fixture(scope="module")
def expected(llm: LLM) -> list[list[int]]:
    prompts = [llm.encode_chat([{"role": "user", "content": c}]) for c in CHATS]
    return [o.token_ids for o in llm.generate(prompts, GREEDY)]
