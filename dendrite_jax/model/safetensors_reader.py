"""Read .safetensors files into numpy memmaps (bf16 via ml_dtypes), checking every offset.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
dtype/shape/byte offsets, then the raw data. Reading it directly keeps bf16 checkpoints
host-side and lazy, and lets errors name the file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from dendrite_jax.model.checkpoint_error import CheckpointError

_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Map tensor name -> read-only memmap. Raises CheckpointError naming the file (and the
    tensor) on any malformed header, offset or size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(path, f"truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(path, f"corrupt safetensors file (a header of {header_len} "
                                  f"bytes in a file of {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(path, f"corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise CheckpointError(path, "tensor entry is not an object", name)
        dtype = _DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise CheckpointError(path, f"tensor has unsupported dtype {info.get('dtype')!r}", name)
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                _is_count(x) for x in offsets) and offsets[0] <= offsets[1]):
            raise CheckpointError(path, f"tensor has bad data_offsets {offsets!r} (two "
                                  "non-negative integers, begin <= end)", name)
        if not (isinstance(shape, list) and all(_is_count(x) for x in shape)):
            raise CheckpointError(path, f"tensor has bad shape {shape!r}", name)
        begin, end = offsets
        expected = math.prod(shape) * np.dtype(dtype).itemsize
        if end - begin != expected:
            raise CheckpointError(path, f"tensor spans {end - begin} bytes, its shape "
                                  f"{tuple(shape)} needs {expected}", name)
        if data_start + end > size:
            raise CheckpointError(path, f"truncated: the tensor ends at byte {data_start + end} "
                                  f"but the file has {size} bytes", name)
        tensors[name] = data[data_start + begin:data_start + end].view(dtype).reshape(shape)
    return tensors


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
