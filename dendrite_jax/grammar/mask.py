"""The token mask: one bit per vocabulary entry, 32 to an int32 word (llguidance's layout: bit
j of word w allows token 32 * w + j), one row per step row.

The host fills rows for constrained requests and leaves the rest all ones; the device unpacks
the bits and sets disallowed logits to -inf inside the jitted sampler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mask_words(vocab_size: int) -> int:
    """int32 words per mask row."""
    return -(-vocab_size // 32)


def allow_all(rows: int, vocab_size: int) -> np.ndarray:
    """A host mask [rows, words] that allows every token."""
    return np.full((rows, mask_words(vocab_size)), -1, np.int32)


def allowed_tokens(mask: jax.Array, vocab_size: int) -> jax.Array:
    """Boolean [S, V]: the bits of mask [S, ceil(V/32)]."""
    bits = jnp.right_shift(mask[:, :, None], jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(mask.shape[0], -1)[:, :vocab_size].astype(bool)
