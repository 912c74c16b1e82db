"""The packed token mask unpacks on device to exactly the bits llguidance's layout means."""

from __future__ import annotations

import jax
import numpy as np

from dendrite_jax.grammar.mask import allow_all, apply_token_mask, mask_words


def test_apply_token_mask_matches_numpy_unpacking():
    rng = np.random.default_rng(0)
    vocab = 77  # not a multiple of 32: the last word is partly padding
    mask = rng.integers(-2**31, 2**31 - 1, (3, mask_words(vocab)), dtype=np.int64).astype(np.int32)
    mask[2] = allow_all(1, vocab)[0]
    logits = rng.normal(size=(3, vocab)).astype(np.float32)
    out = np.asarray(jax.jit(apply_token_mask)(logits, mask))
    bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    np.testing.assert_array_equal(np.isneginf(out), ~bits)
    np.testing.assert_array_equal(out[bits], logits[bits])
    assert not np.isneginf(out[2]).any()  # an all-ones row changes nothing
