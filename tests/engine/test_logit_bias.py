"""Logit bias on the real SmolLM2: biases move greedy and sampled tokens as OpenAI's do, stay
with their own request in a mixed batch, and leave a slot with its request."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.engine.logit_bias import MAX_LOGIT_BIAS, LogitBias, apply_logit_bias
from tests.helpers import SMOLLM

PROMPT = "The capital of France is"


def greedy(max_tokens: int = 6, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def test_apply_adds_each_rows_slot_biases():
    vocab = 8
    bias = LogitBias(ids=jnp.array([[1, 3, vocab], [vocab, vocab, vocab], [0, 7, 2]]),
                     values=jnp.array([[2.0, -1.0, 9.0], [5.0, 5.0, 5.0], [0.5, 1.5, -3.0]]))
    logits = jnp.arange(3 * vocab, dtype=jnp.float32).reshape(3, vocab)
    out = np.asarray(apply_logit_bias(logits, bias, jnp.array([2, 0, 1])))
    want = np.asarray(logits).copy()
    want[0, [0, 7, 2]] += [0.5, 1.5, -3.0]
    want[1, [1, 3]] += [2.0, -1.0]
    np.testing.assert_array_equal(out, want)


def test_a_ban_and_a_boost_move_greedy_tokens(smollm):
    base = smollm.generate([PROMPT], greedy())[0]
    banned = smollm.generate([PROMPT], greedy(logit_bias={base.token_ids[0]: -100}))[0]
    assert banned.token_ids[0] != base.token_ids[0]
    assert base.token_ids[0] not in banned.token_ids
    boosted = smollm.generate([PROMPT], greedy(logit_bias={42: 100}))[0]
    assert boosted.token_ids == [42] * 6


def test_biases_stay_with_their_request(smollm):
    base = smollm.generate([PROMPT], greedy())[0]
    mixed = smollm.generate([PROMPT, PROMPT, PROMPT],
                            [greedy(logit_bias={42: 100}), greedy(),
                             greedy(logit_bias={base.token_ids[0]: -100})])
    assert mixed[0].token_ids == [42] * 6
    assert mixed[1].token_ids == base.token_ids
    assert mixed[2].token_ids[0] != base.token_ids[0]


def test_a_slot_forgets_its_last_requests_bias():
    llm = LLM(**SMOLLM, max_num_seqs=1)  # every request takes the same slot
    base = llm.generate([PROMPT], greedy())[0]
    assert llm.generate([PROMPT], greedy(logit_bias={42: 100}))[0].token_ids == [42] * 6
    assert llm.generate([PROMPT], greedy())[0].token_ids == base.token_ids


def test_logprobs_stay_the_raw_models(smollm):
    base = smollm.generate([PROMPT], greedy(max_tokens=1, logprobs=0))[0]
    forced = smollm.generate([PROMPT], greedy(max_tokens=1, logprobs=0,
                                              logit_bias={42: 100}))[0]
    assert forced.token_ids == [42]
    assert forced.logprobs[0][42].logprob < base.logprobs[0][base.token_ids[0]].logprob


def test_sampled_rows_follow_the_bias(smollm):
    chosen = {42, 260, 1000, 7042}
    out = smollm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=1.0, seed=5,
                                                   top_p=0.9,
                                                   logit_bias={t: 100 for t in chosen}))[0]
    assert set(out.token_ids) <= chosen and len(set(out.token_ids)) > 1


@pytest.mark.parametrize("bias, message", [
    ({1: 100.5}, r"logit_bias\[1\] must be a number in \[-100, 100\]"),
    ({-1: 1.0}, "token ids"),
    ({"7": 1.0}, "token ids"),
    ({1: float("nan")}, "must be a number"),
    ([1, 2], "must map token ids"),
    ({t: 1.0 for t in range(MAX_LOGIT_BIAS + 1)}, f"at most {MAX_LOGIT_BIAS}"),
])
def test_bad_biases_are_refused(bias, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(logit_bias=bias)


def test_ids_past_the_vocabulary_are_refused(smollm):
    with pytest.raises(ValueError, match="below the vocabulary size 49152"):
        smollm.generate([PROMPT], greedy(logit_bias={49152: 1.0}))
