"""Ragged paged attention, dispatched by backend.

`write_and_attend(..., backend=...)` is the one call the model makes: it writes the step's new
keys/values into their pages and returns the step's attention with the updated caches.
`ragged_paged_attention` is the read-only half (for tests and benchmarks). Backends:

- "reference": pure JAX, every platform; the correctness oracle and the CPU path.
- "pallas_gpu": Pallas kernels lowered through Triton (`gpu.py`); on a platform other than a
  GPU it runs in Pallas interpret mode (for debugging, slow).
- "pallas_tpu": a Pallas Mosaic TPU kernel (`tpu.py`); off a TPU it runs in TPU interpret mode.
- "auto": "pallas_gpu" on GPUs, "pallas_tpu" on TPUs, "reference" elsewhere.

Every backend reads FP8 pages too (`fp8`: E4M3, centred and scaled per (layer, KV head)).
FP8 pages may have a full-precision tail (`tail`: the sink and the recent window per slot),
on the reference and GPU backends.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.paged_attention import fp8, gpu, tail, tpu
from kernels_pallas.paged_attention.ragged import RaggedRows, ragged_rows
from kernels_pallas.paged_attention.reference import (
    ragged_paged_attention as reference_ragged_paged_attention,
)
from kernels_pallas.paged_attention.write import write_pages

BACKENDS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
_AUTO = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}


def resolve_backend(backend: str, platform: str | None = None) -> str:
    """Map "auto" to the best backend for `platform` (default: JAX's default backend)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        platform = platform or jax.default_backend()
        return _AUTO.get(platform, "reference")
    return backend


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                           layer: jax.Array, rows: RaggedRows, *, sm_scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           backend: str = "reference", tail_window: int | None = None
                           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention for a step's query tokens [T, Hq, hd] (their rows: `ragged`) over the paged
    cache [L, N, page_size, Hkv, hd] of layer `layer`. With `tail_window`, the positions a
    full-precision tail holds are left out and (output, log-sum-exp [T, Hq]) come back."""
    backend = resolve_backend(backend)
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if tail_window is not None:
        if backend == "pallas_tpu":
            raise ValueError("the TPU attention kernel has no full-precision tail yet")
        kwargs["tail_window"] = tail_window
    args = (q, k_pages, v_pages, layer, rows)
    if backend == "pallas_gpu":
        return gpu.ragged_paged_attention(*args, interpret=jax.default_backend() != "gpu",
                                          **kwargs)
    if backend == "pallas_tpu":
        return tpu.ragged_paged_attention(*args, interpret=jax.default_backend() != "tpu",
                                          **kwargs)
    return reference_ragged_paged_attention(*args, **kwargs)


def write_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, k_pages: jax.Array,
                     v_pages: jax.Array, layer: jax.Array, rows: RaggedRows,
                     slot_pages: jax.Array, slot_offsets: jax.Array, *, sm_scale: float,
                     sliding_window: int | None = None, soft_cap: float | None = None,
                     backend: str = "reference", fp8_pages: fp8.Fp8Calibration | None = None,
                     full_tail: tuple[tail.FullPrecisionTail, tail.TailTokens] | None = None
                     ) -> tuple:
    """Write this step's keys/values k, v [T, Hkv, hd] of layer `layer` into their slots
    (slot_pages, slot_offsets [T]; a page outside the cache writes nowhere), then attend as
    `ragged_paged_attention`. Returns (out [T, Hq, hd], k_pages, v_pages). The GPU backend
    writes a decode-only step's tokens inside its decode kernel; the others scatter first.
    `fp8_pages`: layer `layer`'s calibration of FP8 pages (`fp8`). `full_tail`: FP8 pages'
    full-precision tail and the step's tokens in it (`tail`); the updated tail comes back as
    a fourth result."""
    if fp8_pages is not None:
        return _write_and_attend_fp8(q, k, v, k_pages, v_pages, layer, rows, slot_pages,
                                     slot_offsets, fp8_pages, full_tail, sm_scale=sm_scale,
                                     sliding_window=sliding_window, soft_cap=soft_cap,
                                     backend=backend)
    if full_tail is not None:
        raise ValueError("a full-precision tail is for FP8 pages (or codes), not plain pages")
    backend = resolve_backend(backend)
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if backend == "pallas_gpu":
        return gpu.write_and_attend(q, k, v, k_pages, v_pages, layer, rows, slot_pages,
                                    slot_offsets, interpret=jax.default_backend() != "gpu",
                                    **kwargs)
    k_pages, v_pages = write_pages(k_pages, v_pages, layer, k, v, slot_pages, slot_offsets)
    out = ragged_paged_attention(q, k_pages, v_pages, layer, rows, backend=backend, **kwargs)
    return out, k_pages, v_pages


def _write_and_attend_fp8(q, k, v, k_pages, v_pages, layer, rows, slot_pages, slot_offsets,
                          c: fp8.Fp8Calibration, full_tail, *, sm_scale: float,
                          sliding_window: int | None, soft_cap: float | None,
                          backend: str) -> tuple:
    """`write_and_attend` over FP8 pages: the pages hold (x - mean) / scale; scores use
    queries times the key scale (the key mean only shifts each query's scores, which softmax
    ignores) and outputs come back as v_mean + v_scale * out. A tail's keys are centred the
    same way, so that its scores and the pages' share one shift and merge exactly."""
    if soft_cap is not None:  # the key mean would shift scores inside the cap
        raise ValueError("FP8 pages do not support an attention soft cap")
    if full_tail is not None and backend == "pallas_tpu":
        raise ValueError("the TPU attention kernel has no full-precision tail yet")
    num_heads = q.shape[1]
    scaled_q = q * fp8.query_heads(c.k_scale, num_heads).astype(q.dtype)
    window = full_tail[0].window if full_tail is not None else None
    backend = resolve_backend(backend)
    stored_k, stored_v = fp8.quantize(k, c.k_mean, c.k_scale), fp8.quantize(v, c.v_mean, c.v_scale)
    if backend == "pallas_gpu":
        out, k_pages, v_pages = gpu.write_and_attend(
            scaled_q, stored_k, stored_v, k_pages, v_pages, layer, rows, slot_pages,
            slot_offsets, sm_scale=sm_scale, sliding_window=sliding_window, tail_window=window,
            interpret=jax.default_backend() != "gpu")
    else:
        k_pages, v_pages = write_pages(k_pages, v_pages, layer, stored_k, stored_v, slot_pages,
                                       slot_offsets)
        out = ragged_paged_attention(scaled_q, k_pages, v_pages, layer, rows, sm_scale=sm_scale,
                                     sliding_window=sliding_window, backend=backend,
                                     tail_window=window)
    lse = None
    if full_tail is not None:
        out, lse = out
    out = (fp8.query_heads(c.v_mean, num_heads)
           + out.astype(jnp.float32) * fp8.query_heads(c.v_scale, num_heads))
    real = (slot_pages >= 0) & (slot_pages < k_pages.shape[1])  # padding tokens: zeros
    if full_tail is None:
        return jnp.where(real[:, None, None], out, 0).astype(q.dtype), k_pages, v_pages
    state, tokens = full_tail
    out, state = tail.merge_and_write(state, layer, q, k, v, tokens, out, lse,
                                      sm_scale=sm_scale, sliding_window=sliding_window,
                                      k_shift=c.k_mean)
    return jnp.where(real[:, None, None], out, 0).astype(q.dtype), k_pages, v_pages, state


__all__ = ["BACKENDS", "RaggedRows", "ragged_paged_attention", "ragged_rows",
           "reference_ragged_paged_attention", "resolve_backend", "write_and_attend", "write_pages"]
