"""GPU deployment shapes: which KV backend ``auto`` picks, ``nccl`` refused where workers
can share a GPU (defect 3), and the placement-group bundles that pair a prefill and a
decode worker on one GPU (defect 1)."""

from __future__ import annotations

import pytest

from engine.config import ConfigError
from router.config import RouterConfig
from runtime.config import pair_on_gpus


@pytest.mark.parametrize(("gpus", "backend"), [(0, "ray+collective"), (0.25, "cuda-ipc"),
                                               (0.5, "cuda-ipc"), (1, "collective"),
                                               (2, "collective")])
def test_auto_picks_per_gpu_share(gpus: float, backend: str) -> None:
    assert RouterConfig(gpus_per_worker=gpus).resolved_kv_transfer() == backend


def test_nccl_with_a_fraction_of_a_gpu_is_refused_up_front() -> None:
    with pytest.raises(ConfigError, match=r"kv_transfer nccl needs a whole GPU per worker, "
                                          r"not gpus_per_worker 0\.5"):
        RouterConfig(gpus_per_worker=0.5, kv_transfer="nccl")
    assert RouterConfig(gpus_per_worker=1, kv_transfer="nccl").resolved_kv_transfer() == "nccl"
    assert RouterConfig(gpus_per_worker=0.5, kv_transfer="cuda-ipc").resolved_kv_transfer() \
        == "cuda-ipc"
    with pytest.raises(ConfigError, match="needs GPUs"):
        RouterConfig(kv_transfer="nccl")
    with pytest.raises(ConfigError, match="kv_transfer collective needs a whole GPU"):
        RouterConfig(gpus_per_worker=0.5, kv_transfer="collective")
    assert RouterConfig(kv_transfer="collective").resolved_kv_transfer() == "collective"  # gloo


def test_one_prefill_and_one_decode_share_one_gpu_bundle() -> None:
    plan = pair_on_gpus(1, 1, 0.5)
    assert plan.bundles == ({"GPU": 1.0, "CPU": 2.0},)
    assert plan.bundle_of == {("prefill", 0): 0, ("decode", 0): 0}


def test_pairs_first_then_the_workers_left_over_alone() -> None:
    plan = pair_on_gpus(3, 2, 0.25, cpus_per_worker=2)
    assert plan.bundles == ({"GPU": 0.5, "CPU": 4.0}, {"GPU": 0.5, "CPU": 4.0},
                            {"GPU": 0.25, "CPU": 2.0})
    assert plan.bundle_of == {("prefill", 0): 0, ("decode", 0): 0, ("prefill", 1): 1,
                              ("decode", 1): 1, ("prefill", 2): 2}


def test_workers_too_big_to_share_a_gpu_are_not_paired() -> None:
    plan = pair_on_gpus(1, 1, 0.6)
    assert plan.bundles == ({"GPU": 0.6, "CPU": 1.0}, {"GPU": 0.6, "CPU": 1.0})
    assert plan.bundle_of[("prefill", 0)] != plan.bundle_of[("decode", 0)]
    with pytest.raises(ConfigError, match="gpus_per_worker > 0"):
        pair_on_gpus(1, 1, 0)
    with pytest.raises(ConfigError, match="counts must be >= 0"):
        pair_on_gpus(-1, 1, 0.5)
