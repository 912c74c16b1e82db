"""Paged attention over a compressed KV cache (`dendrite_jax.cache.compressed_kv`).

`write_and_attend(q, k, v, kv, ...)` mirrors `kernels_pallas.paged_attention.write_and_attend`:
it encodes the step's keys/values into their pages, then attends over the rows' pages of codes.
Backends: "reference" (pure JAX, `reference.py`; every platform). No Pallas kernel reads codes
yet: asking for one raises rather than quietly running the reference.
"""

from __future__ import annotations

import jax

from dendrite_jax.cache.compressed_kv import CompressedKVCache
from kernels_pallas.kv_compress.reference import ragged_paged_attention, write_codes

BACKENDS = ("reference",)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"a compressed KV cache runs on attention backends {BACKENDS}; "
                         f"{backend!r} has no kernel for compressed pages yet (pass "
                         "attention_backend='reference')")


def write_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, kv: CompressedKVCache,
                     layer: jax.Array, q_lens: jax.Array, seq_lens: jax.Array,
                     page_tables: jax.Array, slot_pages: jax.Array, slot_offsets: jax.Array, *,
                     num_decode: int, max_q_len: int, sm_scale: float,
                     sliding_window: int | None = None, soft_cap: float | None = None,
                     backend: str = "reference") -> tuple[jax.Array, CompressedKVCache]:
    """Encode this step's k, v [T, Hkv, hd] into their slots, then attend; returns (out
    [T, Hq, hd], the cache)."""
    check_backend(backend)
    kv = write_codes(kv, layer, k, v, slot_pages, slot_offsets)
    out = ragged_paged_attention(q, kv, layer, q_lens, seq_lens, page_tables,
                                 num_decode=num_decode, max_q_len=max_q_len, sm_scale=sm_scale,
                                 sliding_window=sliding_window, soft_cap=soft_cap)
    return out, kv


__all__ = ["BACKENDS", "check_backend", "ragged_paged_attention", "write_and_attend",
           "write_codes"]
