"""Config parsing."""

from __future__ import annotations

from engine.config import ModelConfig


def test_sliding_window_caps_the_context() -> None:
    base = {"model_type": "mistral", "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "max_position_embeddings": 32768}
    assert ModelConfig.from_hf_dict({**base, "sliding_window": 4096}).max_position_embeddings \
        == 4096
    assert ModelConfig.from_hf_dict({**base, "sliding_window": None}).max_position_embeddings \
        == 32768


def test_cuda_graphs_flag_and_roles() -> None:
    """Graphs are on by default for the roles that decode, never for prefill workers
    (they run no decode step); --no-cuda-graphs turns them off everywhere."""
    from router.cli import parser
    from router.settings import settings_from_args

    on = settings_from_args(parser().parse_args(["serve"])).router
    assert {r: on.worker_engine(r).cuda_graphs for r in ("prefill", "decode", "colocated")
            } == {"prefill": False, "decode": True, "colocated": True}
    off = settings_from_args(parser().parse_args(["serve", "--no-cuda-graphs"])).router
    assert not any(off.worker_engine(r).cuda_graphs for r in ("prefill", "decode", "colocated"))
