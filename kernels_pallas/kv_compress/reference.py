"""Pure-JAX paged attention over a compressed cache: the oracle and the CPU path.

The step's new keys/values, minus their layer's calibrated means, are encoded as they are
written (one scatter per code array). Attention runs on the step's decode rows and prefill
blocks (`paged_attention.ragged`) as the plain reference does, gathering each row's pages of
codes a chunk at a time, decoding only those and adding the means back (`KvCompressor.decode`:
for TurboQuant and QJL keys the unbiased estimate, so scores are the papers' estimators). The
decoded context is a per-step temporary of one chunk of the rows being served; the cache itself
stays in codes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels_pallas.codecs.kv import Codes, CompressedPages, KvCompressor
from kernels_pallas.paged_attention.ragged import RaggedRows, attend_ragged
from kernels_pallas.paged_attention.reference import attend_pages
from kernels_pallas.paged_attention.write import scatter_slots


def encode(kv: CompressedPages, layer: jax.Array, k: jax.Array, v: jax.Array
           ) -> tuple[Codes, Codes]:
    """Codes of keys/values [T, Hkv, hd] of layer `layer`, minus the layer's means."""
    return (kv.key_compressor.encode(k.astype(jnp.float32) - kv.k_mean[layer]),
            kv.value_compressor.encode(v.astype(jnp.float32) - kv.v_mean[layer]))


def write_codes(kv: CompressedPages, layer: jax.Array, k: jax.Array, v: jax.Array,
                slot_pages: jax.Array, slot_offsets: jax.Array) -> CompressedPages:
    """Encode keys/values [T, Hkv, hd] of layer `layer` (`encode`) into their (page, offset)
    slots; a slot page outside [0, N) (padding) writes nowhere (`scatter_slots`)."""
    new_k, new_v = encode(kv, layer, k, v)

    def scatter(codes: Codes, new: Codes) -> Codes:
        return {name: scatter_slots(codes[name], layer, new[name], slot_pages, slot_offsets)
                for name in codes}

    return dataclasses.replace(kv, k=scatter(kv.k, new_k), v=scatter(kv.v, new_v))


def _read(codes: Codes, compressor: KvCompressor, mean: jax.Array, layer: jax.Array,
          page_tables: jax.Array) -> jax.Array:
    """Rows' contexts [R, P * page_size, Hkv, hd] decoded from their pages of codes."""
    rows, pages = page_tables.shape
    x = compressor.decode({name: a[layer, page_tables] for name, a in codes.items()})
    return x.reshape(rows, pages * x.shape[2], *x.shape[3:]) + mean[layer]


def ragged_paged_attention(q: jax.Array, kv: CompressedPages, layer: jax.Array,
                           rows: RaggedRows, *, sm_scale: float,
                           sliding_window: int | None = None,
                           soft_cap: float | None = None, tail_window: int | None = None
                           ) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Attention output [T, Hq, hd] of a step's queries (their rows: `ragged`). With
    `tail_window` (`paged_attention.tail`): the tail's positions left out, (output float32,
    log-sum-exp [T, Hq])."""
    def read(tables: jax.Array) -> tuple[jax.Array, jax.Array]:
        return (_read(kv.k, kv.key_compressor, kv.k_mean, layer, tables),
                _read(kv.v, kv.value_compressor, kv.v_mean, layer, tables))

    def attend(row_q, row_q_lens, row_seq_lens, row_tables):
        return attend_pages(row_q, row_q_lens, row_seq_lens, row_tables, read,
                            page_size=kv.page_size, sm_scale=sm_scale,
                            sliding_window=sliding_window, soft_cap=soft_cap,
                            tail_window=tail_window)

    out = attend_ragged(q, rows, attend_prefill=attend)
    return out if tail_window is not None else out.astype(q.dtype)
