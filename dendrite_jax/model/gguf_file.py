"""A GGUF (v2/v3) file reader: metadata as Python values, tensors as numpy views.

One pass over the header with `struct` (the tokenizer alone is ~100k strings, which a generic
reader parses slowly), then tensor data as zero-copy views of a memmap. Dequantization is
left to `gguf.quants`. Every count, offset, dimension and the alignment are checked before use,
so a malformed file raises `CheckpointError` naming itself and the tensor or key.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from dendrite_jax.model.checkpoint_error import CheckpointError

_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS


@dataclasses.dataclass(frozen=True)
class GgufTensor:
    name: str
    quant_type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # numpy order (outermost first)
    data: np.ndarray  # raw bytes for quantized types, typed values for F32/F16

    def dequantize(self) -> np.ndarray:
        from gguf import GGMLQuantizationType, quants

        return quants.dequantize(self.data, GGMLQuantizationType(self.quant_type))


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise CheckpointError(self.path, f"truncated GGUF header (needs byte {self.pos + n}, "
                                  f"the file has {len(self.buf)})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind in _SCALARS and item_kind != 7:
                dtype = np.dtype(_SCALARS[item_kind])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
            return [self.value(item_kind) for _ in range(count)]
        raise CheckpointError(self.path, f"unknown GGUF value type {kind} at byte {self.pos}")


class GgufFile:
    """Metadata (`metadata[key]`) and tensors (`tensors[name]`) of a GGUF file."""

    def __init__(self, path: Path) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        if not path.is_file():
            raise CheckpointError(path, "no such GGUF file")
        if path.stat().st_size == 0:
            raise CheckpointError(path, "empty file, not a GGUF file")
        try:
            data = np.memmap(path, dtype=np.uint8, mode="r")
        except OSError as e:
            raise CheckpointError(path, f"cannot read: {e}") from None
        cursor = _Cursor(memoryview(data), path)
        if bytes(cursor.take(4)) != _MAGIC:
            raise CheckpointError(path, "not a GGUF file (bad magic)")
        version = cursor.scalar("<I")
        if version not in (2, 3):
            raise CheckpointError(path, f"GGUF version {version} is not supported (2 or 3)")
        num_tensors, num_kv = cursor.scalar("<Q"), cursor.scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cursor.string()
            self.metadata[key] = cursor.value(cursor.scalar("<I"))
        infos = []
        for _ in range(num_tensors):
            name = cursor.string()
            num_dims = cursor.scalar("<I")
            if not 1 <= num_dims <= _MAX_DIMS:
                raise CheckpointError(path, f"tensor has {num_dims} dimensions (1 to {_MAX_DIMS})",
                                      name)
            dims = [cursor.scalar("<Q") for _ in range(num_dims)]
            if min(dims) < 1:
                raise CheckpointError(path, f"tensor has an empty dimension: {dims}", name)
            infos.append((name, cursor.scalar("<I"), dims, cursor.scalar("<Q")))
        alignment = self.metadata.get("general.alignment", 32)
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or (
                alignment % 8):
            raise CheckpointError(path, f"must be a positive multiple of 8, got {alignment!r}",
                                  "general.alignment")
        start = -(-cursor.pos // alignment) * alignment
        self.tensors: dict[str, GgufTensor] = {}
        for name, kind, dims, offset in infos:
            if name in self.tensors:
                raise CheckpointError(path, "tensor is listed twice", name)
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise CheckpointError(path, f"tensor has unknown type {kind}", name) from None
            shape = tuple(int(d) for d in reversed(dims))
            if shape[-1] % block:
                raise CheckpointError(path, f"tensor's rows of {shape[-1]} values do not fill "
                                      f"whole blocks of {block}", name)
            if offset % alignment:
                raise CheckpointError(path, f"tensor's offset {offset} is not a multiple of the "
                                      f"alignment {alignment}", name)
            row_bytes = shape[-1] // block * block_bytes
            nbytes = math.prod(shape[:-1]) * row_bytes
            begin = start + offset
            if begin + nbytes > len(data):
                raise CheckpointError(path, f"truncated: the tensor ends at byte {begin + nbytes} "
                                      f"but the file has {len(data)} bytes", name)
            raw = data[begin:begin + nbytes]
            if kind == GGMLQuantizationType.F32:
                raw = raw.view(np.float32).reshape(shape)
            elif kind == GGMLQuantizationType.F16:
                raw = raw.view(np.float16).reshape(shape)
            else:
                raw = raw.reshape(*shape[:-1], row_bytes)
            self.tensors[name] = GgufTensor(name, kind, shape, raw)
