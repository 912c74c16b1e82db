"""Request groups without a model: n/best_of siblings (seeds, donor, ranking flag), all validated
before any is queued, and the output they make (the n best by cumulative logprob)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite_jax.engine.sampling_params import SamplingParams
from dendrite_jax.frontend.groups import group_requests, make_group, start_groups
from dendrite_jax.frontend.streaming import GroupStream
from tests.frontend.fakes import FakeEngine, PieceTokenizer, generate


@st.composite
def group_params(draw) -> SamplingParams:
    n = draw(st.integers(1, 4))
    best_of = draw(st.one_of(st.none(), st.integers(n, 6)))
    seed = draw(st.one_of(st.none(), st.integers(0, 2**32)))
    return SamplingParams(n=n, best_of=best_of, seed=seed, max_tokens=2, temperature=0.7)


@settings(max_examples=200, deadline=None)
@given(params=group_params())
def test_siblings_share_the_first_requests_prompt(params):
    group = make_group(FakeEngine(), "hi", [1, 2, 3], params)
    count = params.num_sequences
    assert len(group.requests) == count and group.request_id == group.requests[0].request_id
    first, *siblings = group.requests
    assert first.donor is None and all(r.donor is first for r in siblings)
    for i, r in enumerate(group.requests):
        assert r.ranked == bool(params.best_of)
        if count == 1:
            assert r.params is params
        else:
            assert (r.params.n, r.params.best_of) == (1, None)
            assert r.params.seed == (None if params.seed is None else params.seed + i)
            assert r.params.temperature == params.temperature


@settings(max_examples=200, deadline=None)
@given(params=group_params(), data=st.data())
def test_a_group_returns_its_n_best(params, data):
    """n outputs; with best_of the n highest cumulative logprobs, best first; without it the
    siblings in order. Streaming a best_of group gives the same n, whole, once all end."""
    tokenizer = PieceTokenizer([chr(ord("a") + i) for i in range(8)])
    group = make_group(FakeEngine(tokenizer), None, [1], params)
    stream = GroupStream(group)
    scores = data.draw(st.lists(st.floats(-50, 0), min_size=len(group.requests),
                                max_size=len(group.requests)))
    streamed = []
    for i, (r, score) in enumerate(zip(group.requests, scores, strict=True)):
        assert not group.finished
        generate(r, [i % 8, 7 - i % 8], [score, 0.0])  # max_tokens 2: it finishes
        deltas = stream.advance(r)
        assert bool(deltas) == (not stream.ranked_at_end or group.finished)
        streamed += deltas
    assert group.finished and stream.finished
    out = group.output()
    if len(group.requests) == 1:
        assert out.samples is None and out == group.requests[0].output()
        assert streamed[0].output == out
        return
    assert len(out.samples) == params.n
    assert dataclasses.replace(out, samples=None) == out.samples[0]
    if params.best_of:
        ranked = sorted(scores, reverse=True)[:params.n]
        assert [s.cumulative_logprob for s in out.samples] == ranked
    else:
        assert [s.request_id for s in out.samples] == [r.request_id for r in group.requests]
    # Streamed live, index i is the i-th sibling (best_of = n ranks them only in the output).
    expected = out.samples if stream.ranked_at_end else [r.output() for r in group.requests]
    assert [d.index for d in streamed] == list(range(params.n))
    assert [d.output for d in streamed] == expected
    assert [(d.token_ids, d.text) for d in streamed] == [(s.token_ids, s.text) for s in expected]


def test_all_prompts_are_validated_before_any_is_queued():
    engine = FakeEngine(PieceTokenizer(["x"]), bad_prompt=[9])
    params = SamplingParams(n=2)
    with pytest.raises(ValueError, match="bad prompt"):
        start_groups(engine, [[1], "two", [9]], [params] * 3)
    with pytest.raises(ValueError, match="expected SamplingParams, got dict"):
        start_groups(engine, [[1], [2]], [params, {"n": 2}])
    assert engine.added == []
    groups = start_groups(engine, [[1], "two"], [params, SamplingParams()])
    assert engine.added == group_requests(groups) and len(engine.added) == 3
    assert groups[1].requests[0].prompt == "two"
    assert groups[1].requests[0].prompt_ids == [3]  # the tokenizer's encoding


def test_text_prompts_need_a_tokenizer():
    with pytest.raises(ValueError, match="fake-model has no tokenizer; pass token-id prompts"):
        start_groups(FakeEngine(), ["text"], [SamplingParams()])
