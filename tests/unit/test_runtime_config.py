"""Worker configs and the Ray resources of a worker, and the actor classes per role."""

from __future__ import annotations

import pytest

from engine.config import ConfigError
from runtime.actors import ACTORS
from runtime.config import ROLES, WorkerConfig, ray_cpus, ray_resources


def test_transfer_timeout_and_watermark_come_from_the_router() -> None:
    with pytest.raises(TypeError, match="transfer_timeout_s"):
        WorkerConfig(worker_id="d-0", role="decode", watermark=0.01)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="watermark"):
        WorkerConfig(worker_id="d-0", role="decode",  # type: ignore[call-arg]
                     transfer_timeout_s=30.0)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("role", "router", "role 'router' is not one of prefill, decode, colocated"),
    ("kv_transfer", "tcp", "kv_transfer 'tcp'"),
    ("transfer_timeout_s", 0.0, "transfer_timeout_s must be > 0"),
    ("watermark", 1.0, r"watermark must be in \[0, 1\)"),
])
def test_worker_config_names_the_bad_field(field: str, value: object, message: str) -> None:
    kw: dict[str, object] = {"worker_id": "w", "role": "decode", "transfer_timeout_s": 30.0,
                             "watermark": 0.01}
    kw[field] = value
    with pytest.raises(ConfigError, match=message):
        WorkerConfig(**kw)  # type: ignore[arg-type]


def test_ray_resources_gpu_share_or_one_cpu_per_thread() -> None:
    assert ray_resources(0.5, 4) == {"num_gpus": 0.5, "num_cpus": 1}
    assert ray_resources(0, 4) == {"num_cpus": 4}
    assert ray_cpus(3, 0, 2) == 6
    assert ray_cpus(3, 1, 2) == 3


def test_one_actor_class_per_role() -> None:
    assert tuple(ACTORS) == ROLES
