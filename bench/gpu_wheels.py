"""Build .whl/: the Python packages the GPU kit needs that the GPU image lacks.

    python bench/gpu_wheels.py            # here, with registry access; then carry .whl

The GPU machine reaches no registry. ../shared/tools/device-wheels.sh downloads Ray
(repacked to fit the 64 MiB working-tree limit), gguf and the gRPC extras for Python
3.12 x86-64; this script runs it and adds what the kit needs beyond it: the router
imports its HTTP edge (Starlette on uvicorn) even with --http-port 0, and the image has
neither. bench/gpu_plan.py REQUIRED_IMPORTS lists every module the kit imports; the dry
run checks each is in the image or in WHEELS. Finally the size of .whl plus the working
tree is checked against the limit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE_WHEELS_SH = ROOT.parent / "shared" / "tools" / "device-wheels.sh"
# What device-wheels.sh downloads (keep in step with it).
FROM_DEVICE_WHEELS = frozenset({
    "ray", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
    "grpcio-health-checking", "grpcio-reflection", "gguf",
})
# The versions the project's tests run with here (pure Python; their needs -- anyio,
# typing-extensions, click, h11 -- are in the image).
EXTRA = {"starlette": "1.10.0", "uvicorn": "0.54.0"}
WHEELS = FROM_DEVICE_WHEELS | frozenset(EXTRA)
LIMIT_BYTES = 64 << 20
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "--platform", "any"]


def tree_bytes() -> int:
    """What travels besides .whl: tracked and untracked-but-not-ignored files."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files
               if f and (ROOT / f.decode()).is_file())


def main() -> int:
    dest = ROOT / ".whl"
    if DEVICE_WHEELS_SH.exists():
        subprocess.run(["bash", str(DEVICE_WHEELS_SH)], cwd=ROOT, check=True)
    else:
        print(f"{DEVICE_WHEELS_SH} not found: Ray, gguf and the gRPC extras are missing")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM,
                    "-d", str(dest), *(f"{k}=={v}" for k, v in EXTRA.items())], check=True)
    wheels = sum(p.stat().st_size for p in dest.glob("*.whl"))
    total = wheels + tree_bytes()
    print(f".whl {wheels / 2**20:.1f} MiB + working tree = {total / 2**20:.1f} MiB "
          f"(limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    return 0 if total <= LIMIT_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
