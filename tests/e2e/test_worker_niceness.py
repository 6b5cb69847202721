"""The Ray that `pdserve serve` starts runs its workers at the priority it has itself.

Ray's default is nice 15 for every worker process (its driver first). pdserve's workers
are the service: at nice 15 a busy neighbour process (or any test job at nice 0) takes
the CPU from the decode loop. The check runs in a subprocess, so the Ray it starts is
its own and leaves with it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os
    import ray
    from router.cli import init_ray
    from router.config import RouterConfig

    init_ray(RouterConfig(mode="colocated", workers=1))

    @ray.remote(num_cpus=1)
    class Probe:
        def niceness(self) -> int:
            return os.nice(0)

    # Ray adds worker_niceness to what the raylet inherits: equal means nothing added.
    print("NICENESS", ray.get(Probe.remote().niceness.remote(), timeout=120) - os.nice(0))
    ray.shutdown()
""")


def test_workers_of_the_ray_pdserve_starts_run_at_niceness_0() -> None:
    if os.nice(0) > 19 - 15:
        pytest.skip("run niced: Ray's default +15 would be capped at 19 and look the same")
    env_free = {"RAY_ADDRESS": "", "RAY_worker_niceness": ""}  # nothing inherited decides
    env = {k: v for k, v in os.environ.items() if k not in env_free}
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "NICENESS 0" in out.stdout, out.stdout + out.stderr[-2000:]
