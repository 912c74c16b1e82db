"""FP8 pages: keys and values stored as E4M3, centred and scaled per (layer, KV head, channel).

A key or value x of KV head h is stored as (x - mean[h]) / scale[h] (channel by channel),
clipped to E4M3's range (`Fp8Calibration` holds the means and scales, measured once on a
calibration text). Centring takes out the large direction the keys of a head share; a scale per
channel keeps small channels beside outlier ones out of E4M3's subnormal range, so each
element keeps E4M3's relative precision. Attention never rescales the pages it reads:
- scores: (q * k_scale) . stored = q . (k - k_mean), which differs from q . k by a constant per
  query, and softmax ignores such a constant (so the key mean is never added back);
- output: sum_j p_j v_j = v_mean + v_scale * sum_j p_j stored_j (the weights sum to 1).
So every backend just reads the pages in the query's dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Calibration:
    """Means and scales [..., Hkv, hd] of FP8 key and value pages: per (layer, KV head,
    channel) in a cache ([L, ...]), one layer's (`layer`) where a step attends."""

    k_mean: jax.Array
    v_mean: jax.Array
    k_scale: jax.Array
    v_scale: jax.Array

    def layer(self, layer: jax.Array) -> Fp8Calibration:
        return jax.tree.map(lambda a: a[layer], self)


def quantize(x: jax.Array, mean: jax.Array, scale: jax.Array) -> jax.Array:
    """x [T, Hkv, hd] as E4M3: minus its KV head's mean, over its scale (each [Hkv, hd];
    clipped, so a value past the calibrated range saturates rather than becoming NaN)."""
    y = (x.astype(jnp.float32) - mean[None]) / scale[None]
    return jnp.clip(y, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)


def query_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """A per-KV-head array [Hkv, ...] for each of `num_heads` query heads (grouped order)."""
    return jnp.repeat(x, num_heads // x.shape[0], axis=0)
