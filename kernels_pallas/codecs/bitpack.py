"""Packing b-bit codes into uint32 words.

Two layouts, chosen by b, both with no wasted bits for whole groups of codes:
- b dividing 32 (1, 2, 4, 8, 16): fields. Each word holds 32 / b consecutive codes, code i of
  the word in bits [b*i, b*i + b). Unpacking a code is one shift and one mask, which is what
  the attention kernels do per element (`kernels_pallas.kv_compress.gpu`).
- any other b (3, 5, 6, 7, ...): bit planes. Codes come in groups of 32; a group is b words,
  word j holding bit j of each of the 32 codes.
A code axis that does not fill its last word (or group) is padded with zero codes (the padding
is real storage and is counted as such).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GROUP = 32  # bits in a word


def is_fields(bits: int) -> bool:
    """Whether b-bit codes are packed as fields (else as bit planes)."""
    return GROUP % bits == 0


def packed_words(n: int, bits: int) -> int:
    """uint32 words holding n codes of `bits` bits."""
    if is_fields(bits):
        return -(-n // (GROUP // bits))
    return -(-n // GROUP) * bits


def _padded(codes: jax.Array, multiple: int) -> jax.Array:
    *lead, n = codes.shape
    return jnp.pad(codes.astype(jnp.uint32), [(0, 0)] * len(lead) + [(0, -n % multiple)])


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """codes [..., n] (integers in [0, 2**bits)) -> uint32 [..., packed_words(n, bits)]."""
    *lead, n = codes.shape
    if is_fields(bits):
        per_word = GROUP // bits
        c = _padded(codes, per_word).reshape(*lead, -1, per_word)
        shifts = bits * jnp.arange(per_word, dtype=jnp.uint32)
        return jnp.sum(c << shifts, axis=-1, dtype=jnp.uint32)
    c = _padded(codes, GROUP).reshape(*lead, -1, GROUP)
    shifts = jnp.arange(GROUP, dtype=jnp.uint32)
    planes = [jnp.sum(((c >> j) & 1) << shifts, axis=-1, dtype=jnp.uint32) for j in range(bits)]
    return jnp.stack(planes, axis=-1).reshape(*lead, -1)


def unpack(words: jax.Array, bits: int, n: int) -> jax.Array:
    """The inverse of `pack`: int32 codes [..., n]."""
    *lead, num_words = words.shape
    if is_fields(bits):
        per_word = GROUP // bits
        shifts = bits * jnp.arange(per_word, dtype=jnp.uint32)
        codes = (words[..., None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*lead, num_words * per_word)[..., :n].astype(jnp.int32)
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
