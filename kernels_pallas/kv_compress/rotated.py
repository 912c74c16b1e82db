"""The rotated domain the code-reading kernels work in (GPU and TPU alike).

A TurboQuant code is a rotated unit vector's grid values (plus a QJL sketch of the residual),
so the kernels score keys against queries rotated once, R q (and sketched, S R q), with the
key mean's contribution q . mean as a per-query offset, and they average values without
rotating them back: the output is rotated back, and the value mean added, once per query.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kernels_pallas.codecs import bitpack
from kernels_pallas.codecs.kv import CompressedPages

HIGHEST = lax.Precision.HIGHEST  # float32 rotations: no TF32 on GPUs


def rotated_queries(q: jax.Array, kv: CompressedPages, layer: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(R q, S R q, q . key mean) for queries [..., Hq, hd]: what the kernels score codes with."""
    key = kv.key_compressor
    group = q.shape[-2] // kv.k_mean.shape[1]
    qf = q.astype(jnp.float32)
    if key.qjl_dim:  # one dot for both: q [R^T | R^T S^T]
        both = np.concatenate([key.rotation.T, key.rotation.T @ key.sketch.T], axis=1)
        out = jnp.matmul(qf, jnp.asarray(both, jnp.float32), precision=HIGHEST)
        q_rot, q_sketch = out[..., :key.head_dim], out[..., key.head_dim:]
    else:  # no QJL stage: the kernels take (and ignore) a zero sketch
        q_rot = jnp.matmul(qf, jnp.asarray(key.rotation.T, jnp.float32), precision=HIGHEST)
        q_sketch = jnp.zeros((*q.shape[:-1], bitpack.GROUP), jnp.float32)
    bias = jnp.einsum("...hd,hd->...h", qf, jnp.repeat(kv.k_mean[layer], group, axis=0),
                      precision=HIGHEST)
    return q_rot.astype(q.dtype), q_sketch.astype(q.dtype), bias


def values_out(out_rot: jax.Array, kv: CompressedPages, layer: jax.Array) -> jax.Array:
    """Rotated-domain outputs [..., Hq, hd] back to values: rotate back, add the value mean."""
    group = out_rot.shape[-2] // kv.v_mean.shape[1]
    rotation = jnp.asarray(kv.value_compressor.rotation, jnp.float32)
    return jnp.matmul(out_rot, rotation, precision=HIGHEST) + jnp.repeat(kv.v_mean[layer], group, axis=0)
