"""Kernel tests: Triton under the interpreter on CPU, or for real on a GPU.

Without a GPU (CI, development machines) the kernels run on CPU tensors under
``TRITON_INTERPRET=1``, which must be set before the kernel modules are imported (triton
reads it when ``@triton.jit`` wraps a function). With a GPU the same tests compile the
kernels and run them on it. ``PDSERVE_KERNEL_DEVICE=cpu|cuda`` forces either
(bench/gpu_check_kernels.py sets ``cuda``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch  # does not import triton

_device = os.environ.get("PDSERVE_KERNEL_DEVICE") or ("cuda" if torch.cuda.is_available()
                                                       else "cpu")
if _device == "cuda" and not torch.cuda.is_available():
    raise pytest.UsageError("PDSERVE_KERNEL_DEVICE=cuda but torch sees no CUDA device")
os.environ["PDSERVE_KERNEL_DEVICE"] = _device  # paged_cases.DEVICE reads it
if _device == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

# The helper modules sit beside the tests; make them importable in any pytest import mode.
sys.path.insert(0, str(Path(__file__).parent))

if _device == "cpu":
    import interpreter_fixes

    interpreter_fixes.install()
