"""Ragged paged attention, dispatched by backend.

`ragged_paged_attention(..., backend=...)` is the one call the model makes. Backends:
"reference" (pure JAX, every platform). Pallas TPU and GPU kernels plug in here, chosen by
platform, with "reference" always available as the oracle.
"""

from __future__ import annotations

import jax

from kernels_pallas.paged_attention.reference import (
    ragged_paged_attention as reference_ragged_paged_attention,
)

BACKENDS = ("auto", "reference")


def resolve_backend(backend: str) -> str:
    """Map "auto" to the best backend for the default JAX platform."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        return "reference"
    return backend


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           layer: jax.Array, q_lens: jax.Array, seq_lens: jax.Array,
                           page_tables: jax.Array, *, num_decode: int, max_q_len: int,
                           sm_scale: float, sliding_window: int | None = None,
                           soft_cap: float | None = None,
                           backend: str = "reference") -> jax.Array:
    """Attention for a step's query tokens [T, Hq, hd] (layout: `engine.step_plan`) over
    the paged cache [L, N, page_size, Hkv, hd] of layer `layer`."""
    backend = resolve_backend(backend)
    return reference_ragged_paged_attention(
        q, k_pages, v_pages, layer, q_lens, seq_lens, page_tables, num_decode=num_decode,
        max_q_len=max_q_len, sm_scale=sm_scale, sliding_window=sliding_window,
        soft_cap=soft_cap)


__all__ = ["BACKENDS", "ragged_paged_attention", "reference_ragged_paged_attention",
           "resolve_backend"]
