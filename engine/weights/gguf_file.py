"""A GGUF file's metadata and tensor directory, and its tensors dequantized on demand.

Why not ``gguf.GGUFReader``: it builds a numpy view for every string of the vocabulary,
which for SmolLM2 (49k tokens + 49k merges) takes ~3 s and ~160 MB per open. Reading
the same header with ``struct`` takes a fraction of that, so processes that only need
the config or the tokenizer (the router) stay cheap. Tensor bytes are mapped with
``numpy.memmap`` one tensor at a time and dequantized by ``gguf.quants.dequantize``;
tests check this reader against ``GGUFReader`` field by field.

Format (little-endian, versions 2 and 3): magic, version, tensor count, metadata count,
metadata key/values, tensor infos (name, dims in ggml ``ne`` order, type, offset), then
the tensor data, aligned to ``general.alignment`` (default 32).
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from engine.weights.errors import WeightLoadError

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# GGUF metadata value types -> numpy dtypes (all little-endian).
_NUMERIC: dict[int, np.dtype[Any]] = {
    t: np.dtype(code)
    for t, code in {
        0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
        10: "<u8", 11: "<i8", 12: "<f8",
    }.items()
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (PyTorch) order: GGUF's ne order reversed
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset of the tensor's data in the file


@dataclass(frozen=True)
class GGUFFile:
    """The parsed header of a GGUF file; tensor data stays on disk until read_tensor."""

    path: str
    version: int
    metadata: dict[str, Any]  # arrays come back as lists, strings as str
    tensors: dict[str, GGUFTensorInfo]  # in file order

    def read_tensor(self, name: str) -> np.ndarray:
        """Dequantize one tensor to a writable float32 array of ``info.shape``."""
        info = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[info.ggml_type]
        cols = info.shape[-1]
        if cols % block:
            raise WeightLoadError(f"{self.path}: tensor {name} row of {cols} is not a "
                                  f"whole number of {info.ggml_type.name} blocks")
        rows = math.prod(info.shape[:-1])
        raw = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset,
                        shape=(rows, cols // block * type_size))
        # A plain ndarray view: numpy's memmap subclass hooks every slice dequantize takes.
        out = dequantize(np.asarray(raw), info.ggml_type)  # (rows, cols) float32; F32: a view
        return np.array(out, dtype=np.float32, copy=not out.flags.writeable).reshape(info.shape)


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def u32(self) -> int:
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def u64(self) -> int:
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def string(self) -> str:
        n = self.u64()
        end = self.pos + n
        if end > len(self.buf):
            raise WeightLoadError(f"{self.path}: truncated GGUF (string past end of file)")
        s = self.buf[self.pos:end].decode("utf-8")
        self.pos = end
        return s

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.u32(), self.u64()
            if etype in _NUMERIC:
                dt = _NUMERIC[etype]
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
                self.pos += count * dt.itemsize
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype in _NUMERIC:
            dt = _NUMERIC[vtype]
            v = np.frombuffer(self.buf, dtype=dt, count=1, offset=self.pos)[0].item()
            self.pos += dt.itemsize
            return v
        raise WeightLoadError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's metadata and tensor directory (no tensor data is read)."""
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _MAGIC:
            raise WeightLoadError(f"{path}: not a GGUF file (bad magic)")
        cur = _Cursor(buf, path)
        cur.pos = 4
        version = cur.u32()
        if version not in (2, 3):
            # A big-endian file reads as a huge version number; v1 used 32-bit counts.
            raise WeightLoadError(f"{path}: GGUF version {version} is not supported "
                                  "(little-endian v2/v3 only)")
        n_tensors, n_kv = cur.u64(), cur.u64()
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.u32())
        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            ne = [cur.u64() for _ in range(cur.u32())]
            raw_infos.append((name, tuple(reversed(ne)), cur.u32(), cur.u64()))
        align = int(metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
        size = len(buf)
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, ttype, rel in raw_infos:
        try:
            qtype = GGMLQuantizationType(ttype)
        except ValueError:
            raise WeightLoadError(f"{path}: tensor {name} has unknown ggml type {ttype}") from None
        info = GGUFTensorInfo(name, shape, qtype, data_start + rel)
        block, type_size = GGML_QUANT_SIZES[qtype]
        if info.offset + math.prod(shape) // block * type_size > size:
            raise WeightLoadError(f"{path}: truncated GGUF (tensor {name} past end of file)")
        tensors[name] = info
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors)
