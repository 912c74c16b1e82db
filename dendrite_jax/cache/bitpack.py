"""Packing b-bit codes into uint32 words, as bit planes.

Codes come in groups of 32; a group of b-bit codes is b words, word j holding bit j of each of
the 32 codes. Any b from 1 to 16 packs with no wasted bits, and unpacking is shifts and masks.
A code axis whose length is not a multiple of 32 is padded with zero codes (the padding is
real storage and is counted as such).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GROUP = 32


def packed_words(n: int, bits: int) -> int:
    """uint32 words holding n codes of `bits` bits."""
    return -(-n // GROUP) * bits


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """codes [..., n] (integers in [0, 2**bits)) -> uint32 [..., packed_words(n, bits)]."""
    *lead, n = codes.shape
    padded = -(-n // GROUP) * GROUP
    c = jnp.pad(codes.astype(jnp.uint32), [(0, 0)] * len(lead) + [(0, padded - n)])
    c = c.reshape(*lead, padded // GROUP, GROUP)
    shifts = jnp.arange(GROUP, dtype=jnp.uint32)
    planes = [jnp.sum(((c >> j) & 1) << shifts, axis=-1, dtype=jnp.uint32) for j in range(bits)]
    return jnp.stack(planes, axis=-1).reshape(*lead, padded // GROUP * bits)


def unpack(words: jax.Array, bits: int, n: int) -> jax.Array:
    """The inverse of `pack`: int32 codes [..., n]."""
    *lead, num_words = words.shape
    groups = num_words // bits
    w = words.reshape(*lead, groups, 1, bits)
    shifts = jnp.arange(GROUP, dtype=jnp.uint32)[:, None]
    planes = (w >> shifts) & 1  # [..., groups, 32, bits]
    codes = jnp.sum(planes << jnp.arange(bits, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
    return codes.reshape(*lead, groups * GROUP)[..., :n].astype(jnp.int32)


def bits_per_element(encode, head_dim: int) -> float:
    """Stored bits per vector element of an encoder: every code array it returns for one
    vector (norms, scales and packing padding included), over head_dim."""
    shapes = jax.eval_shape(encode, jax.ShapeDtypeStruct((1, head_dim), jnp.float32))
    return sum(s.size * s.dtype.itemsize * 8 for s in jax.tree.leaves(shapes)) / head_dim
