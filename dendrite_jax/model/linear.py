"""x @ w for every weight the model holds: a plain array or an FP8 weight
(`kernels_pallas.codecs.fp8`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.codecs.fp8 import Fp8Weight
from kernels_pallas.fp8_matmul import fp8_matmul


def precision_for(w: jax.Array) -> jax.lax.Precision | None:
    """Float32 weights multiply in float32 on every platform (a GPU's default for float32
    is TF32-class, which would make a float32 model disagree with itself across machines);
    narrower weights take the platform's default."""
    return jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None


def linear(x: jax.Array, w: jax.Array | Fp8Weight) -> jax.Array:
    """x [..., K] @ w [K, N]; an FP8 weight goes through its own matmul backend."""
    if isinstance(w, Fp8Weight):
        return fp8_matmul(x, w, w.matmul)
    return jnp.einsum("...k,kn->...n", x, w, precision=precision_for(w))
