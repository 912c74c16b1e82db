"""FP8 weight matmul (`kernels_pallas.codecs.fp8.Fp8Weight`), dispatched by backend.

- "reference": dequantize, then multiply (pure JAX, `reference.py`); every platform.
- "pallas_gpu": a Pallas kernel (Triton lowering) streaming E4M3 weights (`gpu.py`); off a GPU it
  runs in interpret mode.
- "pallas_tpu": a Pallas Mosaic TPU kernel (`tpu.py`); off a TPU, TPU interpret mode.
- "auto": "pallas_gpu" on GPUs, "pallas_tpu" on TPUs, "reference" elsewhere.

The kernels serve matmuls of up to `KERNEL_MAX_ROWS` rows (decode steps, where the weight bytes
are the cost) with N a multiple of 16; bigger ones (prefill chunks) are compute-bound and take
the reference path, as do odd widths. The GPU kernel's one-row path reads half of bf16's bytes
at a somewhat lower rate than XLA's bf16 matmul, so a one-row matmul takes well under bf16's
time; at 32 rows the tensor-core path about matches bf16 per-channel and is slower with MXFP8's
per-32-value scales.
"""

from __future__ import annotations

import jax

from kernels_pallas.codecs.fp8 import Fp8Weight
from kernels_pallas.fp8_matmul import gpu, tpu
from kernels_pallas.fp8_matmul.reference import fp8_matmul as reference_fp8_matmul

BACKENDS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
KERNEL_MAX_ROWS = 128
_AUTO = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def resolve_backend(backend: str, platform: str | None = None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 matmul backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        return _AUTO.get(platform or jax.default_backend(), "reference")
    return backend


def fp8_matmul(x: jax.Array, w: Fp8Weight, backend: str = "reference") -> jax.Array:
    """x [..., K] @ w [K, N] in x's dtype."""
    backend = resolve_backend(backend)
    rows = x.size // x.shape[-1]
    if backend == "reference" or rows > KERNEL_MAX_ROWS or w.shape[-1] % 16:
        return reference_fp8_matmul(x, w)
    with jax.named_scope("fp8_matmul"):
        if backend == "pallas_gpu":
            return gpu.fp8_matmul(x, w, interpret=jax.default_backend() != "gpu")
        return tpu.fp8_matmul(x, w, interpret=jax.default_backend() != "tpu")


__all__ = ["BACKENDS", "KERNEL_MAX_ROWS", "fp8_matmul", "reference_fp8_matmul",
           "resolve_backend"]
