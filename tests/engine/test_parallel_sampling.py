"""Parallel sampling (`n`, `best_of`) on the real SmolLM2: siblings share the prompt's pages and
each samples exactly what it would alone with its seed."""

from __future__ import annotations

import math

import pytest

from dendrite_jax import LLM, SamplingParams
from tests.helpers import SMOLLM
from tests.model.test_smollm_parity import LONG_TEXT

PROMPT = "Once upon a time, in a small village,"


def test_each_sample_equals_its_seed_alone(smollm):
    out = smollm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=1.0, seed=10, n=4))
    samples = out[0].samples
    assert len(samples) == 4 and out[0].token_ids == samples[0].token_ids
    assert len({tuple(s.token_ids) for s in samples}) > 1
    for i, sample in enumerate(samples):
        alone = smollm.generate([PROMPT], SamplingParams(max_tokens=10, temperature=1.0,
                                                         seed=10 + i))[0]
        assert sample.token_ids == alone.token_ids
        assert math.isclose(sample.cumulative_logprob, alone.cumulative_logprob, rel_tol=1e-5)


def test_best_of_returns_the_most_likely(smollm):
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=3, n=2, best_of=5)
    best = smollm.generate([PROMPT, "The recipe calls for"], params)
    for out, prompt in zip(best, [PROMPT, "The recipe calls for"], strict=True):
        alone = [smollm.generate([prompt], SamplingParams(max_tokens=10, temperature=1.0,
                                                          seed=3 + i))[0] for i in range(5)]
        ranked = sorted(alone, key=lambda o: -o.cumulative_logprob)[:2]
        assert [s.token_ids for s in out.samples] == [o.token_ids for o in ranked]


def test_siblings_share_the_prompt_pages():
    llm = LLM(**SMOLLM, max_num_seqs=4,
              max_num_batched_tokens=512)
    prompt = llm.tokenizer.encode(LONG_TEXT)[:320]  # 20 full pages
    llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.8, seed=1, n=4))
    stats = llm.stats().pool
    alone = 4 * math.ceil((320 + 8) / 16)
    assert stats.high_watermark <= 20 + 4 * 2 < alone / 2
    assert stats.used == 0


def test_parameters():
    with pytest.raises(ValueError, match="best_of must be an integer >= n"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        SamplingParams(n=0)


def test_add_request_and_stream_refuse_what_they_cannot_do(smollm):
    with pytest.raises(ValueError, match="for n or best_of use generate or stream"):
        smollm.add_request(PROMPT, SamplingParams(n=2))
    with pytest.raises(ValueError, match="stream cannot rank best_of"):
        list(smollm.stream([PROMPT], SamplingParams(n=1, best_of=2)))
