"""Paged attention over a compressed KV cache (`dendrite_jax.cache.compressed_kv`).

`write_and_attend(q, k, v, kv, ...)` mirrors `kernels_pallas.paged_attention.write_and_attend`:
it encodes the step's keys/values into their pages, then attends over the pages of codes of the
step's decode rows and prefill blocks (`kernels_pallas.paged_attention.ragged`).
Backends:

- "reference": pure JAX (`reference.py`), every compression, every platform; the oracle.
- "pallas_gpu": Pallas kernels that score and average codes directly (`gpu.py`) for the
  TurboQuant caches ("turboquant-<b>", "turboquant-mse-<b>"); off a GPU they run in interpret
  mode. Other compressions have no kernel: asking for one raises.
- "pallas_tpu": a Pallas Mosaic TPU kernel (`tpu.py`) for the MSE-stage TurboQuant caches
  of 1, 2, 4 or 8 bits ("turboquant-mse-4", ...); off a TPU it runs in TPU interpret mode.
- "auto": the platform's kernel where it reads the compression, else "reference".

A full-precision tail (`paged_attention.tail`) is read on the reference and GPU backends.
"""

from __future__ import annotations

import jax

from kernels_pallas.codecs.kv import CompressedPages, make_kv_compression
from kernels_pallas.kv_compress import gpu, tpu
from kernels_pallas.kv_compress.reference import ragged_paged_attention, write_codes
from kernels_pallas.paged_attention import tail
from kernels_pallas.paged_attention.ragged import RaggedRows

BACKENDS = ("auto", "reference", "pallas_gpu", "pallas_tpu")
_KERNELS = {"pallas_gpu": ("gpu", gpu.kernel_supports), "pallas_tpu": ("tpu", tpu.kernel_supports)}


def resolve_backend(backend: str, compression: str, head_dim: int,
                    platform: str | None = None) -> str:
    """The backend that runs a compressed cache: "auto" picks the platform's kernel where it
    reads this compression, else the reference; an explicit kernel that cannot raises."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
    compressors = make_kv_compression(compression, head_dim)
    if backend == "auto":
        platform = platform or jax.default_backend()
        for name, (kernel_platform, supports) in _KERNELS.items():
            if platform == kernel_platform and supports(*compressors) is None:
                return name
        return "reference"
    if backend in _KERNELS:
        reason = _KERNELS[backend][1](*compressors)
        if reason:
            raise ValueError(f"attention backend {backend!r} has no kernel for a "
                             f"{compression!r} cache ({reason}); pass "
                             "attention_backend='reference' or 'auto'")
    return backend


def write_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, kv: CompressedPages,
                     layer: jax.Array, rows: RaggedRows, slot_pages: jax.Array,
                     slot_offsets: jax.Array, *, sm_scale: float,
                     sliding_window: int | None = None, soft_cap: float | None = None,
                     backend: str = "reference",
                     full_tail: tuple[tail.FullPrecisionTail, tail.TailTokens] | None = None
                     ) -> tuple:
    """Encode this step's k, v [T, Hkv, hd] into their slots (slot_pages, slot_offsets [T]; a
    page outside the cache writes nowhere), then attend over the step's rows (`ragged`);
    returns (out [T, Hq, hd], the cache). Every backend scatters the codes first
    (`reference.write_codes`) and its kernels read them back from the pages (a GPU decode
    kernel storing them itself was slower: `gpu.write_and_attend`). `full_tail`: the cache's
    full-precision tail and the step's tokens in it (reference and GPU backends); the
    updated tail comes back as a third result."""
    kwargs = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if full_tail is not None:
        if backend not in ("reference", "pallas_gpu"):
            raise ValueError(f"compressed-cache backend {backend!r} has no full-precision tail "
                             "yet; use attention_backend='reference' or 'pallas_gpu'")
        if soft_cap is not None:
            raise ValueError("a full-precision tail does not support an attention soft cap yet")
        state, tokens = full_tail
        if backend == "pallas_gpu":
            (out, lse), kv = gpu.write_and_attend(
                q, k, v, kv, layer, rows, slot_pages, slot_offsets, tail_window=state.window,
                interpret=jax.default_backend() != "gpu", **kwargs)
        else:
            kv = write_codes(kv, layer, k, v, slot_pages, slot_offsets)
            out, lse = ragged_paged_attention(q, kv, layer, rows, tail_window=state.window,
                                              **kwargs)
        out, state = tail.merge_and_write(state, layer, q, k, v, tokens, out, lse,
                                          sm_scale=sm_scale, sliding_window=sliding_window)
        return out.astype(q.dtype), kv, state
    if backend == "pallas_gpu":
        return gpu.write_and_attend(q, k, v, kv, layer, rows, slot_pages, slot_offsets,
                                    interpret=jax.default_backend() != "gpu", **kwargs)
    if backend == "pallas_tpu":
        kv = write_codes(kv, layer, k, v, slot_pages, slot_offsets)
        out = tpu.ragged_paged_attention(q, kv, layer, rows,
                                         interpret=jax.default_backend() != "tpu", **kwargs)
    elif backend == "reference":
        kv = write_codes(kv, layer, k, v, slot_pages, slot_offsets)
        out = ragged_paged_attention(q, kv, layer, rows, **kwargs)
    else:
        raise ValueError(f"compressed-cache attention backend {backend!r}: resolve it first "
                         "(`resolve_backend`)")
    return out, kv


__all__ = ["BACKENDS", "ragged_paged_attention", "resolve_backend", "write_and_attend",
           "write_codes"]
