"""Pure-JAX FP8 weight matmul: dequantize, then multiply. The oracle and the CPU path."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.codecs.fp8 import Fp8Weight, dequantize_stored


def rms_normalize(x: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x²) + eps) over the last axis, computed in float32, in x's dtype: the
    input of a weight with a folded norm (`Fp8Weight.input_rms_eps`)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(
        x.dtype)


def fp8_matmul(x: jax.Array, w: Fp8Weight) -> jax.Array:
    """x [..., K] @ w [K, N] in x's dtype (XLA fuses the dequantization into the dot's operand
    where it can; otherwise it materialises the weight in x's dtype); x normalised first for a
    weight with a folded norm."""
    if w.input_rms_eps is not None:
        x = rms_normalize(x, w.input_rms_eps)
    return jnp.einsum("...k,nk->...n", x, dequantize_stored(w, x.dtype))
