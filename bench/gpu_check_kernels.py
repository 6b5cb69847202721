"""Run the kernel correctness tests for real on a CUDA GPU (compiled, not interpreted).

tests/kernels runs the Triton kernels under the CPU interpreter by default. With
PDSERVE_KERNEL_DEVICE=cuda the same tests put every tensor on the GPU, compile the
kernels for it and also go through kernels.ops (which dispatches CUDA tensors to
Triton). This script sets that up, runs pytest and records the outcome in
bench/results/kernels-check-<gpu-name>.json with the command that produced it:

    python bench/gpu_check_kernels.py            # the whole tier
    python bench/gpu_check_kernels.py -k decode  # extra arguments go to pytest
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench/gpu_check_kernels.py needs a CUDA GPU (torch.cuda.is_available() is "
                 "False); on CPU run: pytest tests/kernels (Triton interpreter)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PDSERVE_KERNEL_DEVICE"] = "cuda"
    cmd = [sys.executable, "-m", "pytest", "tests/kernels", "-q", "-rA", *argv]
    run = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True)
    output = run.stdout + run.stderr
    print(output)
    gpu = torch.cuda.get_device_name()
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", output)}
    import triton

    result = {
        "command": shlex.join(["python", "bench/gpu_check_kernels.py", *argv]),
        "gpu": gpu,
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "cuda": torch.version.cuda},
        "returncode": run.returncode,
        "counts": counts,
        "output_tail": output[-6000:],
    }
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    path = _ROOT / "bench" / "results" / f"kernels-check-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {path}")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
