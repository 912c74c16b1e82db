"""A seeded request through the engine samples each token as the sampler defines it: the token
at position p is argmax(logits_p / temperature + Gumbel(seed, p)), with the logits computed
from the model alone. Determinism and batch invariance hold whatever position the noise is
keyed by; this holds only if the engine keys it by the token's own position."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dendrite_jax import SamplingParams
from dendrite_jax.engine.sampling import gumbel_noise
from tests.helpers import paged_logits

SEED, TEMPERATURE = 1234, 0.8


def test_seeded_tokens_follow_the_sampler_at_their_positions(smollm):
    prompt = smollm.tokenizer.encode("Once upon a time, in a small village by the mountains,")
    params = SamplingParams(max_tokens=12, temperature=TEMPERATURE, seed=SEED, ignore_eos=True)
    # alone and beside another request: the same tokens
    out = smollm.generate([prompt], params)[0].token_ids
    beside = smollm.generate([prompt, "The capital of France is"], [
        params, SamplingParams(max_tokens=5, temperature=1.0, seed=7)])[0].token_ids
    assert beside == out
    ids = prompt + out
    logits = paged_logits(smollm.model.params, smollm.model.config, ids)
    positions = np.arange(len(prompt), len(ids))  # where each sampled token sits
    noise = np.asarray(gumbel_noise(jnp.full(len(out), SEED, jnp.uint32),
                                    jnp.asarray(positions, jnp.int32), logits.shape[-1]))
    want = np.argmax(logits[positions - 1] / TEMPERATURE + noise, axis=-1)
    assert out == want.tolist()
    # and not the noise of any one position for all of them (the sampled text varies with it)
    first = np.asarray(gumbel_noise(jnp.full(len(out), SEED, jnp.uint32),
                                    jnp.zeros(len(out), jnp.int32), logits.shape[-1]))
    assert out != np.argmax(logits[positions - 1] / TEMPERATURE + first, axis=-1).tolist()
