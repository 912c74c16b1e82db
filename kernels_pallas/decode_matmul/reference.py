"""Pure-JAX decode matmul: the oracle for the kernels and the path everywhere else.

    out = [residual +] epilogue(rms_norm(x) @ w)

with the model's own RMSNorm (float32, rounded to x's dtype before the matmul), `epilogue` the
SwiGLU product silu(x @ w_gate) * (x @ w_up) when `gate_up` (w = [w_gate | w_up]), else none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * weight.astype(jnp.float32)).astype(x.dtype)


def decode_matmul(x: jax.Array, w: jax.Array, *, norm_weight: jax.Array | None = None,
                  eps: float = 1e-6, gate_up: bool = False,
                  residual: jax.Array | None = None) -> jax.Array:
    if norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    out = jnp.einsum("tk,kn->tn", x, w)
    if gate_up:
        gate, up = jnp.split(out, 2, axis=-1)
        out = jax.nn.silu(gate) * up
    return out if residual is None else residual + out
