"""Make the Triton CPU interpreter do bf16 the way the GPU does (tests only).

The interpreter (checked on triton 3.9) keeps bf16 tensors as their raw uint16 bits and
gets two bf16 operations wrong, which a compiled kernel gets right:

- ``tl.dot`` on bf16 operands multiplies the raw bits as integers (garbage);
- ``x.to(tl.bfloat16)`` from fp32 truncates the mantissa, where the GPU rounds to
  nearest even (so every bf16 store would be off by up to one ulp).

``install()`` patches those two interpreter builder methods and then checks both against
torch, so a triton upgrade that changes the internals fails here, loudly, instead of
skewing kernel results. The kernels themselves carry no interpreter-specific code.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16_bits_rtne(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round half to even on the dropped 16 bits
    out = (bits >> 16).astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = 0x7FC0  # keep NaNs NaN whatever their payload
    return out


def install() -> None:
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    handle = interp.TensorHandle
    orig_cast: Any = builder.cast_impl
    orig_dot: Any = builder.create_dot

    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return handle(_f32_to_bf16_bits_rtne(src.data), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    def create_dot(self: Any, a: Any, b: Any, d: Any, *args: Any) -> Any:
        if a.dtype.scalar == tl.bfloat16:
            a = handle(_bf16_bits_to_f32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = handle(_bf16_bits_to_f32(b.data), tl.float32)
        return orig_dot(self, a, b, d, *args)

    builder.cast_impl = cast_impl
    # fp_trunc and friends were bound to the old cast_impl by lambdas that look it up by
    # name on self, so patching the method reaches them.
    builder.create_dot = create_dot
    _self_check()


def _self_check() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def probe(x_ptr, y_ptr, dot_ptr, cast_ptr):
        r = tl.arange(0, 16)
        x = tl.load(x_ptr + r[:, None] * 16 + r[None, :])  # bf16
        y = tl.load(y_ptr + r[:, None] * 16 + r[None, :])  # fp32
        tl.store(dot_ptr + r[:, None] * 16 + r[None, :], tl.dot(x, x))
        tl.store(cast_ptr + r[:, None] * 16 + r[None, :], y.to(tl.bfloat16))

    gen = torch.Generator().manual_seed(0)
    x = torch.randn((16, 16), generator=gen).bfloat16()
    y = torch.randn((16, 16), generator=gen)
    dot = torch.empty((16, 16))
    cast = torch.empty((16, 16), dtype=torch.bfloat16)
    probe[(1,)](x, y, dot, cast)
    torch.testing.assert_close(dot, x.float() @ x.float(), rtol=1e-5, atol=1e-5,
                               msg="interpreter bf16 tl.dot is still wrong")
    if not torch.equal(cast, y.bfloat16()):
        raise AssertionError("interpreter fp32 -> bf16 cast does not round to nearest even")
