"""FP8 pages: keys and values stored as E4M3, each divided by its (layer, KV head)'s scale.

A value x of KV head h is stored as x / scale[h], clipped to E4M3's range. Attention never
rescales the pages it reads: scores q . k = (q * k_scale) . (k / k_scale) scale the query, and
the output sum_j p_j v_j = v_scale * sum_j p_j (v_j / v_scale) scales the result, so every
backend just reads the pages in the query's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448


def is_fp8(pages: jax.Array) -> bool:
    return pages.dtype == FP8_DTYPE


def quantize(x: jax.Array, scale: jax.Array) -> jax.Array:
    """x [T, Hkv, hd] as E4M3 after dividing by its KV head's scale [Hkv] (clipped, so a value
    past the calibrated range saturates rather than becoming NaN)."""
    y = x.astype(jnp.float32) / scale[None, :, None]
    return jnp.clip(y, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def query_heads(scale: jax.Array, num_heads: int) -> jax.Array:
    """A per-KV-head scale [Hkv] for each of `num_heads` query heads (grouped-query order)."""
    return jnp.repeat(scale, num_heads // scale.shape[0])
