"""The packed token mask unpacks on device to exactly the bits llguidance's layout means."""

from __future__ import annotations

import jax
import numpy as np

from dendrite_jax.grammar.mask import allow_all, allowed_tokens, mask_words


def test_allowed_tokens_match_numpy_unpacking():
    rng = np.random.default_rng(0)
    vocab = 77  # not a multiple of 32: the last word is partly padding
    mask = rng.integers(-2**31, 2**31 - 1, (3, mask_words(vocab)), dtype=np.int64).astype(np.int32)
    mask[2] = allow_all(1, vocab)[0]
    allowed = np.asarray(jax.jit(allowed_tokens, static_argnums=1)(mask, vocab))
    bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")[:, :vocab].astype(bool)
    assert allowed.shape == (3, vocab)
    np.testing.assert_array_equal(allowed, bits)
    assert 0 < bits[:2].sum() < 2 * vocab  # random rows both allow and forbid
    assert allowed[2].all()  # an all-ones row allows every token
