"""On-device sampling: exact top-k/top-p/min-p masks, penalties, and the sampler's law."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dendrite_jax.engine.sampling import (
    SamplingBatch,
    apply_penalties,
    gumbel_noise,
    sample,
    top_logprobs,
    truncation_mask,
)
from dendrite_jax.engine.sampling_params import SamplingParams

PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.01, 0.01])
LOGITS = np.log(PROBS).astype(np.float32)


def batch(n=1, **kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                presence_penalty=0.0, frequency_penalty=0.0, seed=0)
    base.update(kw)
    dtypes = {"top_k": jnp.int32, "seed": jnp.uint32}
    return SamplingBatch(**{k: jnp.full((n,), v, dtypes.get(k, jnp.float32))
                            for k, v in base.items()})


def mask(top_k=0, top_p=1.0, min_p=0.0, logits=LOGITS):
    return np.asarray(truncation_mask(jnp.asarray(logits)[None], jnp.array([top_k]),
                                      jnp.array([top_p], jnp.float32),
                                      jnp.array([min_p], jnp.float32)))[0]


@pytest.mark.parametrize("kwargs,kept", [
    (dict(), 8),
    (dict(top_k=3), 3),
    (dict(top_k=1), 1),
    (dict(top_k=-1), 8),
    (dict(top_p=0.6), 2),  # 0.4 < 0.6 <= 0.65
    (dict(top_p=0.7), 3),
    (dict(top_p=0.01), 1),  # the most likely token always survives
    (dict(min_p=0.3), 3),  # p >= 0.12
    (dict(min_p=0.5), 2),  # p >= 0.2
    (dict(top_k=3, top_p=0.8), 2),  # renormalised over top-3: [.5, .3125, .1875]
    (dict(top_k=5, min_p=0.3), 3),
])
def test_truncation_masks_exact(kwargs, kept):
    m = mask(**kwargs)
    assert m.tolist() == [True] * kept + [False] * (8 - kept)


@pytest.mark.parametrize("top_p,kept", [(0.5, 1), (0.75, 2), (0.875, 3), (0.5000001, 2),
                                         (0.9999999, 5)])
def test_top_p_at_its_boundary(top_p, kept):
    """Powers of two make the mass before a token equal top_p exactly: that token is dropped
    (the smallest prefix whose mass reaches top_p), one a hair past it is kept."""
    probs = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625], np.float32)
    logits = np.log(probs)
    # the boundary is exact only if float32 softmax returns these powers of two exactly
    np.testing.assert_array_equal(np.asarray(jax.nn.softmax(jnp.asarray(logits))), probs)
    assert mask(top_p=top_p, logits=logits).tolist() == [True] * kept + [False] * (5 - kept)


def test_ties_at_the_cutoff_survive():
    logits = np.log(np.array([0.3, 0.2, 0.2, 0.2, 0.1], np.float32))
    assert mask(top_k=2, logits=logits).tolist() == [True, True, True, True, False]


def test_penalties_match_formulae():
    logits = jnp.array([[2.0, -1.0, 0.5, 3.0]])
    prompt_mask = jnp.array([[True, True, False, False]])
    counts = jnp.array([[0, 0, 2, 1]])
    b = batch(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    out = np.asarray(apply_penalties(logits, prompt_mask, counts, b))[0]
    expected = [2.0 / 2, -1.0 * 2, 0.5 / 2 - 0.25 * 2 - 0.5, 3.0 / 2 - 0.25 - 0.5]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_greedy_and_sampled_rows_in_one_batch():
    """Rows alternate greedy and sampled: greedy rows take the argmax whatever their noise,
    sampled rows the Gumbel-max of their own (seed, position)."""
    n = 40
    logits = jnp.tile(jnp.asarray(LOGITS), (n, 1))
    greedy = np.arange(n) % 2 == 0
    b = SamplingBatch(**{**batch(n).__dict__, "temperature": jnp.where(greedy, 0.0, 1.0),
                         "seed": jnp.arange(n, dtype=jnp.uint32)})
    positions = jnp.full((n,), 3, jnp.int32)
    tokens = np.asarray(sample(logits, b, positions, truncate=False))
    noise = np.asarray(gumbel_noise(b.seed, positions, len(PROBS)))
    assert np.all(tokens[greedy] == 0)
    want = np.argmax(LOGITS[None] + noise, axis=-1)
    np.testing.assert_array_equal(tokens[~greedy], want[~greedy])
    assert np.any(tokens[~greedy] != 0) and np.any(want[greedy] != 0)  # the noise mattered


def test_sampler_follows_the_distribution():
    """Gumbel-max over 20k (seed, position) keys reproduces the softmax probabilities."""
    n = 20000
    logits = jnp.tile(jnp.asarray(LOGITS), (n, 1))
    b = SamplingBatch(**{**batch(n).__dict__, "seed": jnp.arange(n, dtype=jnp.uint32)})
    tokens = np.asarray(sample(logits, b, jnp.zeros(n, jnp.int32), truncate=False))
    freq = np.bincount(tokens, minlength=8) / n
    tolerance = 4 * np.sqrt(PROBS * (1 - PROBS) / n) + 1e-3  # ~4 standard errors
    assert np.all(np.abs(freq - PROBS) <= tolerance), (freq, PROBS)


def test_sampler_follows_the_distribution_along_one_request():
    """One seed, 20k consecutive positions: the tokens of one request follow the law too."""
    n = 20000
    logits = jnp.tile(jnp.asarray(LOGITS), (n, 1))
    b = SamplingBatch(**{**batch(n).__dict__, "seed": jnp.full((n,), 7, jnp.uint32)})
    tokens = np.asarray(sample(logits, b, jnp.arange(n, dtype=jnp.int32), truncate=False))
    freq = np.bincount(tokens, minlength=8) / n
    tolerance = 4 * np.sqrt(PROBS * (1 - PROBS) / n) + 1e-3
    assert np.all(np.abs(freq - PROBS) <= tolerance), (freq, PROBS)


def test_gumbel_noise_is_standard_gumbel_and_uncorrelated():
    """Moments of the standard Gumbel law (mean: Euler's constant, variance pi^2/6), finite
    everywhere, no correlation between neighbouring tokens or positions, and a uniform argmax
    over a large vocabulary (the hash must not favour any token ids)."""
    rows, vocab = 512, 8192
    noise = np.asarray(gumbel_noise(jnp.full((rows,), 3, jnp.uint32),
                                    jnp.arange(rows, dtype=jnp.int32), vocab), np.float64)
    assert np.isfinite(noise).all() and noise.max() < 16.7 and noise.min() > -2.9
    assert abs(noise.mean() - np.euler_gamma) < 0.01
    assert abs(noise.var() - np.pi**2 / 6) < 0.02
    centred = noise - noise.mean()
    for a, b in ((centred[:, :-1], centred[:, 1:]), (centred[:-1], centred[1:])):
        assert abs(np.mean(a * b) / noise.var()) < 0.01
    # argmax of pure noise: uniform over 64 buckets of token ids (chi-square, 63 dof; the
    # 1e-4 quantile is ~117)
    n = 8192
    wide = gumbel_noise(jnp.arange(n, dtype=jnp.uint32), jnp.zeros(n, jnp.int32), 4096)
    counts = np.bincount(np.asarray(jnp.argmax(wide, axis=-1)) // 64, minlength=64)
    expected = n / 64
    assert np.sum((counts - expected) ** 2 / expected) < 117


def test_sampled_tokens_respect_the_mask_and_temperature():
    n = 4000
    logits = jnp.tile(jnp.asarray(LOGITS), (n, 1))
    seeds = jnp.arange(n, dtype=jnp.uint32)
    b = SamplingBatch(**{**batch(n, top_k=2).__dict__, "seed": seeds})
    positions = jnp.zeros(n, jnp.int32)
    assert set(np.asarray(sample(logits, b, positions, truncate=True)).tolist()) == {0, 1}
    # Without the (static) truncation variant, top-k is not applied: the engine picks the
    # variant from the batch's requests (`SamplingParams.needs_sort`).
    assert len(set(np.asarray(sample(logits, b, positions, truncate=False)).tolist())) > 2
    hot = SamplingBatch(**{**batch(n, temperature=0.05).__dict__, "seed": seeds})
    assert np.mean(np.asarray(sample(logits, hot, positions, truncate=False)) == 0) > 0.99


def test_same_seed_and_position_same_token_any_batch():
    logits = jnp.tile(jnp.asarray(LOGITS), (6, 1))
    b = SamplingBatch(**{**batch(6).__dict__,
                         "seed": jnp.array([5, 9, 5, 1, 5, 7], jnp.uint32)})
    positions = jnp.array([10, 10, 10, 10, 11, 10])
    tokens = np.asarray(sample(logits, b, positions, truncate=False))
    assert tokens[0] == tokens[2]
    alone = SamplingBatch(**{**batch(1).__dict__, "seed": jnp.array([5], jnp.uint32)})
    assert np.asarray(sample(logits[:1], alone, jnp.array([10]), truncate=False))[0] == tokens[0]


def test_top_logprobs_rank_and_order():
    lp = jnp.log(jnp.asarray(np.tile(np.concatenate([PROBS, np.full(24, 1e-9)]), (1, 1))))
    lp = lp - jnp.log(jnp.sum(jnp.exp(lp)))
    chosen_lp, rank, top_lp, top_ids = top_logprobs(lp, jnp.array([2]))
    assert int(rank[0]) == 3 and np.asarray(top_ids)[0, :3].tolist() == [0, 1, 2]
    assert np.all(np.diff(np.asarray(top_lp)[0]) <= 0)
    np.testing.assert_allclose(float(chosen_lp[0]), float(lp[0, 2]))
    unranked = top_logprobs(lp, jnp.array([2]), ranked=False)
    assert float(unranked[0][0]) == float(chosen_lp[0])
    assert not np.any(np.asarray(unranked[2]))


def test_neutral_penalties_leave_logits_bit_identical():
    """The step applies penalties unconditionally (no device-side branch)."""
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 50)), jnp.float32)
    prompt_mask = jnp.asarray(np.random.default_rng(1).random((3, 50)) < 0.3)
    counts = jnp.asarray(np.random.default_rng(2).integers(0, 3, (3, 50)), jnp.int32)
    out = apply_penalties(logits, prompt_mask, counts, batch(3))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(logits))


def test_needs_sort_picks_the_costly_variant_only_when_used():
    def _needs_sort(params):
        return params.needs_sort

    assert not _needs_sort(SamplingParams(temperature=0, top_k=5))  # greedy ignores top-k
    assert not _needs_sort(SamplingParams(temperature=0.8))
    assert _needs_sort(SamplingParams(temperature=0.8, top_p=0.9))
    assert _needs_sort(SamplingParams(temperature=0.8, min_p=0.1))
    assert _needs_sort(SamplingParams(temperature=0, logprobs=0))
