"""Writing a step's new keys and values into their page slots (an XLA scatter)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def unique_slots(slot_pages: jax.Array, slot_offsets: jax.Array, num_pages: int,
                 page_size: int) -> tuple[jax.Array, jax.Array]:
    """Scatter indices (pages, offsets) [T] in which every token outside the cache (a page
    outside [0, num_pages): padding) has its own out-of-range slot, so that all T slots are
    distinct: the tokens inside the cache already are (each sequence position has its own
    slot; copy-on-write gives forked sequences their own pages before they write).

    Distinct slots let the scatter promise `unique_indices`, which on a GPU turns XLA's
    serialised scatter into plain stores, several times faster for a long prefill's write."""
    outside = (slot_pages < 0) | (slot_pages >= num_pages)
    pages = jnp.where(outside, num_pages, slot_pages)
    offsets = jnp.where(outside, page_size + jnp.arange(slot_pages.shape[0]), slot_offsets)
    return pages, offsets


def scatter_slots(pages: jax.Array, layer: jax.Array, new: jax.Array, slot_pages: jax.Array,
                  slot_offsets: jax.Array) -> jax.Array:
    """pages [L, N, page_size, ...] with new [T, ...] stored at layer `layer`'s (page, offset)
    slots; a slot page outside [0, N) writes nowhere. Slots inside the cache must be distinct."""
    slot_pages, slot_offsets = unique_slots(slot_pages, slot_offsets, pages.shape[1],
                                            pages.shape[2])
    return pages.at[layer, slot_pages, slot_offsets].set(new.astype(pages.dtype), mode="drop",
                                                         unique_indices=True)


def write_pages(k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array, k: jax.Array,
                v: jax.Array, slot_pages: jax.Array,
                slot_offsets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter keys/values [T, Hkv, hd] of layer `layer` into (page, offset) slots of the
    caches [L, N, page_size, Hkv, hd] (`scatter_slots`)."""
    return (scatter_slots(k_pages, layer, k, slot_pages, slot_offsets),
            scatter_slots(v_pages, layer, v, slot_pages, slot_offsets))
