"""Matmuls with their neighbouring elementwise work fused, dispatched by backend.

`decode_matmul(x, w, norm_weight=, gate_up=, residual=, backend=)` is the one call the model
makes for each projection (`reference.py` says what it computes). Backends:

- "xla": the pure-JAX reference (XLA's own dots and fusions); every platform.
- "pallas_gpu": the fused Pallas kernel (`gpu.py`) for steps of at most `gpu.MAX_ROWS` rows
  (decode steps), XLA's dots for larger ones (prefill). Off a GPU it runs in interpret mode.
- "auto": "pallas_gpu" on GPUs, "xla" elsewhere.
"""

from __future__ import annotations

import jax

from kernels_pallas.decode_matmul import gpu, reference

BACKENDS = ("auto", "xla", "pallas_gpu")


def resolve_backend(backend: str, platform: str | None = None) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown matmul backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        return "pallas_gpu" if (platform or jax.default_backend()) == "gpu" else "xla"
    return backend


def gpu_tuning(rows: int, k: int, n_out: int, gate_up: bool) -> gpu.MatmulTuning | None:
    """The kernel's tuning for a shape (measured on an H100, `benchmarks/decode_matmul.py`),
    None where the kernel does not take it."""
    preferred = (gpu.MatmulTuning(block_n=64, block_k=128, num_warps=8, num_stages=3) if gate_up
                 else gpu.MatmulTuning(block_n=16, block_k=256, num_warps=4, num_stages=4))
    for block_k in (preferred.block_k, 128, 64, 32, 16):
        for block_n in (preferred.block_n, 32, 16):
            tuning = gpu.MatmulTuning(block_n=block_n, block_k=min(block_k, preferred.block_k),
                                      num_warps=preferred.num_warps,
                                      num_stages=preferred.num_stages)
            if gpu.supports(rows, k, n_out, tuning):
                return tuning
    return None


def decode_matmul(x: jax.Array, w: jax.Array, *, norm_weight: jax.Array | None = None,
                  eps: float = 1e-6, gate_up: bool = False, residual: jax.Array | None = None,
                  backend: str = "xla") -> jax.Array:
    """[residual +] epilogue(rms_norm(x) @ w) for x [M, K]; see `reference.decode_matmul`."""
    kwargs = dict(norm_weight=norm_weight, eps=eps, gate_up=gate_up, residual=residual)
    if backend == "pallas_gpu":
        n_out = w.shape[1] // 2 if gate_up else w.shape[1]
        tuning = gpu_tuning(x.shape[0], x.shape[1], n_out, gate_up)
        if tuning is not None:
            if norm_weight is not None:  # fused in the kernel it ran 5x slower (NOTES.md)
                x = reference.rms_norm(x, norm_weight, eps)
                kwargs["norm_weight"] = None
            return gpu.decode_matmul(x, w, **kwargs, tuning=tuning,
                                     interpret=jax.default_backend() != "gpu")
    elif backend != "xla":
        raise ValueError(f"unknown matmul backend {backend!r}; choose from {BACKENDS}")
    return reference.decode_matmul(x, w, **kwargs)
