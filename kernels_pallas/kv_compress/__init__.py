"""Paged attention over a compressed KV cache (`dendrite_jax.cache.compressed_kv`).

`write_and_attend(q, k, v, kv, ...)` mirrors `kernels_pallas.paged_attention.write_and_attend`:
it encodes the step's keys/values into their pages, then attends over the rows' pages of codes.
Backends:

- "reference": pure JAX (`reference.py`), every compression, every platform; the oracle.
- "pallas_gpu": Pallas kernels that score and average codes directly (`gpu.py`) for the
  TurboQuant caches ("turboquant-<b>", "turboquant-mse-<b>"); off a GPU they run in interpret
  mode. Other compressions have no kernel: asking for one raises.
- "auto": "pallas_gpu" on a GPU when the compression has a kernel, else "reference".
"""

from __future__ import annotations

import jax

from dendrite_jax.cache.compress import make_kv_compression
from dendrite_jax.cache.compressed_kv import CompressedKVCache
from kernels_pallas.kv_compress import gpu
from kernels_pallas.kv_compress.reference import ragged_paged_attention, write_codes

BACKENDS = ("auto", "reference", "pallas_gpu")


def resolve_backend(backend: str, compression: str, head_dim: int,
                    platform: str | None = None) -> str:
    """The backend that runs a compressed cache: "auto" picks the GPU kernel where one reads
    this compression, else the reference; an explicit backend without a kernel raises."""
    if backend not in BACKENDS + ("pallas_tpu",):
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    reason = gpu.kernel_supports(*make_kv_compression(compression, head_dim))
    if backend == "auto":
        platform = platform or jax.default_backend()
        return "pallas_gpu" if platform == "gpu" and reason is None else "reference"
    if backend == "pallas_tpu" or (backend == "pallas_gpu" and reason):
        raise ValueError(f"attention backend {backend!r} has no kernel for a {compression!r} "
                         f"cache ({reason or 'no TPU kernel reads codes yet'}); pass "
                         "attention_backend='reference' or 'auto'")
    return backend


def write_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, kv: CompressedKVCache,
                     layer: jax.Array, q_lens: jax.Array, seq_lens: jax.Array,
                     page_tables: jax.Array, slot_pages: jax.Array, slot_offsets: jax.Array, *,
                     num_decode: int, max_q_len: int, sm_scale: float,
                     sliding_window: int | None = None, soft_cap: float | None = None,
                     backend: str = "reference") -> tuple[jax.Array, CompressedKVCache]:
    """Encode this step's k, v [T, Hkv, hd] into their slots, then attend; returns (out
    [T, Hq, hd], the cache)."""
    kv = write_codes(kv, layer, k, v, slot_pages, slot_offsets)
    kwargs = dict(num_decode=num_decode, max_q_len=max_q_len, sm_scale=sm_scale,
                  sliding_window=sliding_window, soft_cap=soft_cap)
    if backend == "pallas_gpu":
        out = gpu.ragged_paged_attention(q, kv, layer, q_lens, seq_lens, page_tables,
                                         interpret=jax.default_backend() != "gpu", **kwargs)
    elif backend == "reference":
        out = ragged_paged_attention(q, kv, layer, q_lens, seq_lens, page_tables, **kwargs)
    else:
        raise ValueError(f"compressed-cache attention backend {backend!r}: resolve it first "
                         "(`resolve_backend`)")
    return out, kv


__all__ = ["BACKENDS", "ragged_paged_attention", "resolve_backend", "write_and_attend",
           "write_codes"]
