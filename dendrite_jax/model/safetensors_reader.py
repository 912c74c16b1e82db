"""Read .safetensors files into numpy memmaps (bf16 via ml_dtypes), checking every offset.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
dtype/shape/byte offsets, then the raw data. Reading it directly keeps bf16 checkpoints
host-side and lazy, and lets errors name the file and the tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Map tensor name -> read-only memmap. Raises ValueError naming the file on corruption."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if 8 + header_len > size:
            raise ValueError(f"{path}: truncated safetensors file (header of {header_len} bytes "
                             f"does not fit in {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != expected:
            raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape "
                             f"{shape} needs {expected}")
        if data_start + end > size:
            raise ValueError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} "
                             f"but the file has {size} bytes")
        tensors[name] = data[data_start + begin:data_start + end].view(dtype).reshape(shape)
    return tensors
