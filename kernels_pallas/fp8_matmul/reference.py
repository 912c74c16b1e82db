"""Pure-JAX FP8 weight matmul: dequantize, then multiply. The oracle and the CPU path."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dendrite_jax.quant.fp8 import Fp8Weight, dequantize_stored


def fp8_matmul(x: jax.Array, w: Fp8Weight) -> jax.Array:
    """x [..., K] @ w [K, N] in x's dtype (XLA fuses the dequantization into the dot's operand
    where it can; otherwise it materialises the weight in x's dtype)."""
    return jnp.einsum("...k,nk->...n", x, dequantize_stored(w, x.dtype))
