"""Pure-JAX paged attention over a compressed cache: the oracle and the CPU path.

The step's new keys/values, minus their layer's calibrated means, are encoded as they are
written (one scatter per code array). Attention gathers each row's pages of codes, decodes only
those and adds the means back (`KvCompressor.decode`: for TurboQuant and QJL keys the unbiased
estimate, so scores are the papers' estimators), then attends as the plain reference does.
The decoded context is a per-step temporary of the rows being served; the cache itself stays
in codes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dendrite_jax.cache.compress import Codes, KvCompressor
from dendrite_jax.cache.compressed_kv import CompressedKVCache
from kernels_pallas.paged_attention.blocks import attend_by_block
from kernels_pallas.paged_attention.reference import attend_context
from kernels_pallas.paged_attention.write import scatter_slots


def encode(kv: CompressedKVCache, layer: jax.Array, k: jax.Array, v: jax.Array
           ) -> tuple[Codes, Codes]:
    """Codes of keys/values [T, Hkv, hd] of layer `layer`, minus the layer's means."""
    return (kv.key_compressor.encode(k.astype(jnp.float32) - kv.k_mean[layer]),
            kv.value_compressor.encode(v.astype(jnp.float32) - kv.v_mean[layer]))


def write_codes(kv: CompressedKVCache, layer: jax.Array, k: jax.Array, v: jax.Array,
                slot_pages: jax.Array, slot_offsets: jax.Array) -> CompressedKVCache:
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


def ragged_paged_attention(q: jax.Array, kv: CompressedKVCache, layer: jax.Array,
                           q_lens: jax.Array, seq_lens: jax.Array, page_tables: jax.Array, *,
                           num_decode: int, max_q_len: int, sm_scale: float,
                           sliding_window: int | None = None,
                           soft_cap: float | None = None) -> jax.Array:
    """Attention output [T, Hq, hd] of a step's queries (layout: `engine.step_plan`)."""
    def attend(rows, row_q_lens, row_seq_lens, row_tables):
        k = _read(kv.k, kv.key_compressor, kv.k_mean, layer, row_tables)
        v = _read(kv.v, kv.value_compressor, kv.v_mean, layer, row_tables)
        return attend_context(rows, k, v, row_q_lens, row_seq_lens, sm_scale=sm_scale,
                              sliding_window=sliding_window, soft_cap=soft_cap)

    out = attend_by_block(q, q_lens, seq_lens, page_tables, num_decode=num_decode,
                          max_q_len=max_q_len, attend_prefill=attend)
    return out.astype(q.dtype)
