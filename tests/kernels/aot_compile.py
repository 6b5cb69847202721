"""Compile every Triton kernel for a real GPU target on a machine without a GPU.

The interpreter runs the kernels' maths on CPU but never lowers them, so it cannot see
what only the compiler checks (dot operand shapes and dtypes, layouts, register and
shared-memory budgets). triton ships its own LLVM and ptxas, so the full pipeline
(TTIR -> TTGIR -> LLVM IR -> PTX -> cubin) runs here for an NVIDIA target without a
device. Run it with TRITON_INTERPRET unset (the test does it in a subprocess):

    python tests/kernels/aot_compile.py [--arch 90 80]

Configurations are the ones the wrappers launch (block sizes, dtypes, head dims).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

# Hopper's shared memory per block (227 KiB opt-in) is the budget a kernel must fit.
_MAX_SHARED = {90: 227 * 1024, 80: 163 * 1024}


@dataclass
class Spec:
    kernel: Any  # a triton JITFunction
    label: str
    types: dict[str, str]  # pointer and float argument types; other runtime args are i32
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=lambda: {"num_warps": 4})


def _specs(quick: bool) -> list[Spec]:
    """The launch configurations of the wrappers; quick: bf16 all, fp32 attention only."""
    import torch

    from kernels import triton_attention as ta
    from kernels import triton_cache as tc
    from kernels import triton_layers as tla

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    specs = []
    meta = {"bt_ptr": "*i32", "seq_lens_ptr": "*i32", "qsl_ptr": "*i32", "scale_log2e": "fp32"}
    for dt, torch_dt in dtypes.items():
        if quick and dt == "fp16":
            continue
        prec = ta._dot_precision(torch_dt)
        io = {"q_ptr": f"*{dt}", "cache_ptr": f"*{dt}", "out_ptr": f"*{dt}",
              "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", **meta}
        for g, d, splits in ((4, 128, 4), (1, 64, 1), (8, 256, 1)):
            cfg = ta.decode_config(torch_dt, d)
            specs.append(Spec(ta._decode_split_kernel, f"decode {dt} G={g} D={d} S={splits}", io,
                              dict(G=g, BLOCK_G=16, D=d, BS=16, BLOCK_N=cfg.block_n,
                                   NUM_SPLITS=splits, DOT_PREC=prec, QUANT=False),
                              {"num_warps": cfg.num_warps}))
        for g, d in ((4, 128), (1, 64), (3, 256)):
            cfg = ta.prefill_config(torch_dt, d)
            specs.append(Spec(ta._prefill_kernel, f"prefill {dt} G={g} D={d}", io,
                              dict(G=g, D=d, BS=16, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                   DOT_PREC=prec, QUANT=False),
                              {"num_warps": cfg.num_warps}))
        if quick and dt == "fp32":
            continue
        specs.append(Spec(ta._decode_reduce_kernel, f"reduce {dt}",
                          {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "qsl_ptr": "*i32",
                           "out_ptr": f"*{dt}"},
                          dict(HQ=32, D=128, NUM_SPLITS=5, BLOCK_S=8)))
        specs.append(Spec(tc._store_kv_kernel, f"store_kv {dt}",
                          {"k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "cache_ptr": f"*{dt}",
                           "slot_ptr": "*i64"},
                          dict(HKV=8, D=128, BS=16, BLOCK_H=8, BLOCK_D=128, QUANT=False,
                               IS_INT8=False, QMAX=127.0)))
        for gather in (True, False):
            specs.append(Spec(tc._copy_blocks_kernel, f"copy_blocks {dt} gather={gather}",
                              {"src_ptr": f"*{dt}", "dst_ptr": f"*{dt}", "ids_ptr": "*i64"},
                              dict(GATHER=gather, CHUNK=tc._COPY_CHUNK)))
        specs.append(Spec(tla._rms_norm_kernel, f"rms_norm {dt}",
                          {n: f"*{dt}" for n in ("x_ptr", "res_ptr", "w_ptr", "out_ptr",
                                                 "res_out_ptr")} | {"eps": "fp32"},
                          dict(H=4096, BLOCK_H=4096, HAS_RESIDUAL=True)))
        specs.append(Spec(tla._rotary_kernel, f"rotary {dt}",
                          {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "pos_ptr": "*i64",
                           "cs_ptr": "*fp32"},
                          dict(H=32, HALF=64, BLOCK_H=32, BLOCK_HALF=64)))
        specs.append(Spec(tla._silu_and_mul_kernel, f"silu_and_mul {dt}",
                          {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}"}, dict(BLOCK=1024)))
    # Quantized KV caches (kernels/kv_quant.py), bf16 activations: int8 and fp8 e4m3.
    for kv in ("i8", "fp8e4nv"):
        io = {"q_ptr": "*bf16", "cache_ptr": f"*{kv}", "out_ptr": "*bf16",
              "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", **meta}
        cfg = ta.decode_config(torch.bfloat16, 128)
        specs.append(Spec(ta._decode_split_kernel, f"decode bf16 kv={kv} G=4 D=128 S=4", io,
                          dict(G=4, BLOCK_G=16, D=128, BS=16, BLOCK_N=cfg.block_n,
                               NUM_SPLITS=4, DOT_PREC="tf32", QUANT=True),
                          {"num_warps": cfg.num_warps}))
        cfg = ta.prefill_config(torch.bfloat16, 128)
        specs.append(Spec(ta._prefill_kernel, f"prefill bf16 kv={kv} G=4 D=128", io,
                          dict(G=4, D=128, BS=16, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                               DOT_PREC="tf32", QUANT=True),
                          {"num_warps": cfg.num_warps}))
        specs.append(Spec(tc._store_kv_kernel, f"store_kv bf16 kv={kv}",
                          {"k_ptr": "*bf16", "v_ptr": "*bf16", "cache_ptr": f"*{kv}",
                           "slot_ptr": "*i64"},
                          dict(HKV=8, D=128, BS=16, BLOCK_H=8, BLOCK_D=128, QUANT=True,
                               IS_INT8=kv == "i8", QMAX=127.0 if kv == "i8" else 448.0)))
    return specs


class Report(NamedTuple):
    label: str
    shared: int  # bytes of shared memory
    registers: int | None  # per thread, from ptxas -v (None when no ptxas could read it)
    spill_bytes: int | None  # spill stores


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int] | None:
    """(registers, spill store bytes) from the ptxas triton ships, or None."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        # triton may ship several ptxas; the newest that accepts the PTX version wins.
        for exe in sorted(bin_dir.glob("ptxas*"), reverse=True):
            arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
            run = subprocess.run([str(exe), "-v", "--gpu-name", arch_name, str(src), "-o",
                                  str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", run.stderr)
            spill = re.search(r"(\d+) bytes spill stores", run.stderr)
            if run.returncode == 0 and regs and spill:
                return int(regs.group(1)), int(spill.group(1))
    return None


def compile_all(archs: list[int], quick: bool = False) -> list[Report]:
    """Compile every spec for every arch to a cubin; raises on failure or a shared-memory
    budget overrun."""
    import triton
    from triton.backends.compiler import GPUTarget

    reports = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for spec in _specs(quick):
            fn = spec.kernel
            sig = {n: "constexpr" if n in spec.constexprs else spec.types.get(n, "i32")
                   for n in fn.arg_names}
            src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=spec.constexprs)
            compiled = triton.compile(src, target=target, options=spec.options)
            label = f"sm_{arch} {spec.label}"
            if "cubin" not in compiled.asm:
                raise RuntimeError(f"{label}: no cubin produced")
            shared = compiled.metadata.shared
            if shared > _MAX_SHARED[arch]:
                raise RuntimeError(f"{label}: {shared} B shared memory is over the "
                                   f"{_MAX_SHARED[arch]} B a block can have")
            ptxas = _ptxas_report(compiled.asm["ptx"], arch)
            regs, spill = ptxas if ptxas else (None, None)
            reports.append(Report(label, shared, regs, spill))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(_MAX_SHARED))
    parser.add_argument("--quick", action="store_true", help="bf16 everything, fp32 attention")
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
    reports = compile_all(args.arch, args.quick)
    if args.json:
        print(json.dumps([r._asdict() for r in reports]))
        return
    for r in reports:
        print(f"{r.label}: shared {r.shared} B, registers {r.registers}, "
              f"spill stores {r.spill_bytes} B")


if __name__ == "__main__":
    main()
