"""cuda-ipc's logic on CPU: which path a pair takes (defect 1), the bookkeeping of opened
IPC mappings, finding the cache's allocation for export (one pool, not two: defect 7),
and the one-kernel block copy (defect 8) -- its torch path here, the Triton kernel under
the interpreter in a subprocess."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvtransfer.base import KVTransferError, TransferHandle
from kvtransfer.block_copy import copy_blocks
from kvtransfer.cuda_ipc import CudaIpcReceiver, allocation_of
from kvtransfer.ipc_mappings import IpcMappings
from kvtransfer.pairing import transfer_path, visible_index
from messages.transfer import KVSpec

ROOT = Path(__file__).resolve().parents[2]


def test_a_pair_on_one_gpu_uses_ipc_and_one_on_two_gpus_falls_back_to_nccl() -> None:
    # Ray shows each actor its own GPU only: the decode worker's is visible iff shared.
    assert transfer_path(["GPU-a"], "GPU-a", True, "d0") == ("ipc", 0)
    assert transfer_path(["GPU-a"], "GPU-b", True, "d0") == ("nccl", None)
    # Without Ray's isolation, another visible GPU is found by its UUID.
    assert visible_index(["GPU-a", "GPU-b"], "GPU-b") == 1
    with pytest.raises(KVTransferError, match=r"d0's GPU .* offers no NCCL fallback"):
        transfer_path(["GPU-a"], "GPU-b", False, "d0")


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_mappings_open_once_reopen_for_a_replaced_worker_and_close_when_idle() -> None:
    opened: list[str] = []
    closed: list[str] = []
    clock = Clock()
    maps: IpcMappings[str] = IpcMappings(lambda a: opened.append(a) or f"map:{a}",
                                         closed.append, idle_close_s=60, clock=clock)
    assert maps.get("d0", b"h1", "A") == "map:A"
    assert maps.get("d0", b"h1", "A") == "map:A" and opened == ["A"]
    assert maps.get("d0", b"h2", "B") == "map:B"  # same id, new cache: a replacement
    assert closed == ["map:A"]
    maps.get("d1", b"h3", "C")
    clock.t = 50
    maps.get("d1", b"h3", "C")
    clock.t = 100  # d0 unused for 100 s, d1 for 50 s
    assert maps.close_idle() == ["d0"] and closed == ["map:A", "map:B"]
    assert "d1" in maps and "d0" not in maps
    maps.close_all()
    assert closed[-1] == "map:C"


def test_the_cache_is_exported_from_the_allocation_that_holds_it() -> None:
    segments = [{"device": 0, "address": 1000, "total_size": 500},
                {"device": 0, "address": 4096, "total_size": 1 << 20},
                {"device": 1, "address": 4096, "total_size": 1 << 30}]
    assert allocation_of(4096 + 512, 0, segments) == (4096, 1 << 20)
    assert allocation_of(4096 + (1 << 21), 1, segments) == (4096, 1 << 30)
    with pytest.raises(KVTransferError, match="cannot be exported"):
        allocation_of(2000, 0, segments)
    expandable = [{"device": 0, "address": 0, "total_size": 1 << 30, "is_expandable": True}]
    with pytest.raises(KVTransferError, match="expandable segments"):
        allocation_of(4096, 0, expandable)


def test_a_cuda_ipc_handle_needs_no_fetch_and_an_nccl_one_goes_to_the_fallback() -> None:
    spec = KVSpec((1, 2, 4, 1, 8), "float32", 4)
    rx = CudaIpcReceiver()
    ipc = TransferHandle("r1", "cuda-ipc", spec, 2, 2 * spec.block_nbytes())
    assert asyncio.run(rx.fetch(ipc, 1.0)) is None
    nccl = TransferHandle("r2", "nccl", spec, 2, 2 * spec.block_nbytes())
    with pytest.raises(KVTransferError, match="no NCCL receive is posted"):
        asyncio.run(rx.fetch(nccl, 1.0))


def test_block_copy_moves_whole_blocks_and_nothing_else() -> None:
    src = torch.randn(6, 2, 2, 4, 3, 8)
    dst = torch.zeros(9, 2, 2, 4, 3, 8)
    copy_blocks(src, torch.tensor([4, 1, 5]), dst, torch.tensor([8, 2, 3]))
    assert torch.equal(dst[[8, 2, 3]], src[[4, 1, 5]])
    assert dst[[0, 1, 4, 5, 6, 7]].abs().sum() == 0
    copy_blocks(src, torch.tensor([], dtype=torch.long), dst, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="caches differ"):
        copy_blocks(src, torch.tensor([1]), dst[:, :1].contiguous(), torch.tensor([1]))
    with pytest.raises(ValueError, match="block id lists differ"):
        copy_blocks(src, torch.tensor([1, 2]), dst, torch.tensor([1]))
    with pytest.raises(ValueError, match="contiguous"):
        copy_blocks(src, torch.tensor([1]), dst.transpose(1, 2), torch.tensor([1]))


_INTERPRETED = """
import torch
from kvtransfer.block_copy import copy_blocks
src = torch.randn(5, 2, 2, 16, 2, 64).to(torch.bfloat16)   # 8192 elements: 2 programs/block
dst = torch.zeros(7, 2, 2, 16, 2, 64, dtype=torch.bfloat16)
copy_blocks(src, torch.tensor([3, 1, 4]), dst, torch.tensor([6, 2, 9]))  # 9: out of range
assert torch.equal(dst[[6, 2]], src[[3, 1]])
assert dst[[0, 1, 3, 4, 5]].abs().sum() == 0  # the out-of-range id wrote nothing
print("ok")
"""


def test_the_triton_block_copy_kernel_under_the_interpreter() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", _INTERPRETED], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
