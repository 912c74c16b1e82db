"""Writing a step's new keys and values into their page slots (an XLA scatter)."""

from __future__ import annotations

import jax


def write_pages(k_pages: jax.Array, v_pages: jax.Array, layer: jax.Array, k: jax.Array,
                v: jax.Array, slot_pages: jax.Array,
                slot_offsets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Scatter keys/values [T, Hkv, hd] of layer `layer` into (page, offset) slots of the
    caches [L, N, page_size, Hkv, hd]; a slot page outside [0, N) (padding) writes nowhere."""
    idx = (layer, slot_pages, slot_offsets)
    return (k_pages.at[idx].set(k.astype(k_pages.dtype), mode="drop"),
            v_pages.at[idx].set(v.astype(v_pages.dtype), mode="drop"))
