"""The ray KV transfer backend on its own: exact bytes, any dtype, checked handles."""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine.kv_layout import KVLayout
from kernels import scatter_blocks
from kvtransfer import KVTransferError, check_handle, make_receiver, make_sender, spec_of
from tests.e2e.runtime_fixtures import ensure_ray


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ray_round_trip_is_exact(dtype: torch.dtype) -> None:
    ensure_ray()
    layout = KVLayout(num_blocks=10, num_layers=3, block_size=4, num_kv_heads=2, head_dim=8,
                      dtype=dtype)
    src = torch.randn(layout.shape).to(dtype)
    dst = layout.allocate("cpu")
    spec = spec_of(layout)
    rx = make_receiver("ray")
    ep = rx.endpoint(dst, "decode-x", spec)
    handle = make_sender("ray").send(src, [7, 2, 5], ep, [1, 8, 3], "r1")
    assert handle.nbytes == 3 * layout.bytes_per_block
    check_handle(handle, spec, [1, 8, 3])
    staging = asyncio.run(rx.fetch(handle, timeout_s=10))
    scatter_blocks(dst, torch.tensor([1, 8, 3]), staging)
    assert torch.equal(dst[[1, 8, 3]], src[[7, 2, 5]])
    assert dst[[0, 2, 4, 5, 6, 7, 9]].abs().sum() == 0  # nothing else written


def test_handle_checks_name_the_mismatch() -> None:
    ensure_ray()
    a = KVLayout(4, 2, 4, 2, 8, torch.float32)
    b = KVLayout(4, 2, 8, 2, 8, torch.float32)  # another block size
    ep = make_receiver("ray").endpoint(a.allocate("cpu"), "d", spec_of(a))
    handle = make_sender("ray").send(a.allocate("cpu"), [1, 2], ep, [1, 2], "r2")
    with pytest.raises(KVTransferError, match="layout mismatch"):
        check_handle(handle, spec_of(b), [1, 2])
    with pytest.raises(KVTransferError, match="1 reserved"):
        check_handle(handle, spec_of(a), [3])
