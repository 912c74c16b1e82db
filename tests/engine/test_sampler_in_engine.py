"""The engine applies the sampler as `engine.sampling` defines it, checked against logits
computed from the model alone (one forward over the prompt and the engine's output):

- a seeded request's token at position p is argmax(logits_p / temperature + Gumbel(seed, p)):
  determinism and batch invariance hold whatever position the noise is keyed by, this only if
  the engine keys it by the token's own position;
- penalties count the request's output tokens, from the first, apart from its prompt's."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

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


# (repetition, frequency, presence): on this prompt the first two change the greedy text if the
# first output token goes uncounted (as a prompt token, say)
@pytest.mark.parametrize("rep,freq,pres", [(1.0, 0.0, 1.0), (1.0, 1.0, 0.0), (1.3, 0.5, 1.5)])
def test_penalties_count_every_output_token_apart_from_the_prompt(smollm, rep, freq, pres):
    prompt = smollm.tokenizer.encode("one two one two one two one two one two")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                            repetition_penalty=rep, frequency_penalty=freq,
                            presence_penalty=pres)
    out = smollm.generate([prompt], params)[0].token_ids
    logits = paged_logits(smollm.model.params, smollm.model.config, prompt + out)
    in_prompt = np.zeros(logits.shape[-1], bool)
    in_prompt[prompt] = True
    counts = np.zeros(logits.shape[-1])
    want = []
    for i in range(len(out)):
        row = logits[len(prompt) + i - 1].astype(np.float64)
        seen = in_prompt | (counts > 0)
        row = np.where(seen, np.where(row > 0, row / rep, row * rep), row)
        row = row - freq * counts - pres * (counts > 0)
        want.append(int(np.argmax(row)))
        counts[out[i]] += 1  # the engine's token: a wrong one is reported once, not cascaded
    assert out == want
