"""The bucket policy's step sizing: the scheduler cuts a compute-bound mixed step's last
prefill chunk to a compiled token count rather than pad it past `PAD_SLACK`, and never starves
prefill."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dendrite_jax.engine.buckets import (
    CUT_MIN_TOKENS,
    PAD_SLACK,
    all_shapes,
    longest_first,
    mixed_ladder,
    prefill_to_fit,
)


@given(budget=st.sampled_from([16, 48, 512, 600, 2048]), data=st.data())
def test_prefill_to_fit(budget, data):
    num_decode = data.draw(st.integers(0, budget - 1))
    num_prefill = data.draw(st.integers(0, budget - num_decode))
    ladder = mixed_ladder(budget)
    total = num_decode + num_prefill
    rung = min(t for t in ladder if t >= total)
    kept = prefill_to_fit(num_decode, num_prefill, budget)
    if num_prefill == 0:
        assert kept == 0
        return
    assert 1 <= kept <= num_prefill
    below = [t for t in ladder if t < total]
    if kept < num_prefill:  # cut: the step fills a rung exactly, where padding would be large
        assert num_decode + kept in ladder and rung > total * (1 + PAD_SLACK)
        assert num_decode + kept >= CUT_MIN_TOKENS
    else:  # whole: the padding is small, the step small, or no rung below has a prefill token
        assert rung <= total * (1 + PAD_SLACK) or not below or max(below) < CUT_MIN_TOKENS or (
            max(below) <= num_decode)


def test_prefill_to_fit_examples():
    assert prefill_to_fit(5, 300, 512) == 256 - 5  # 305 tokens would pad to 512
    assert prefill_to_fit(5, 470, 512) == 470  # 475 pads to 512 by under 10%
    assert prefill_to_fit(40, 10, 64) == 10  # the rung below (32) holds no prefill token
    assert prefill_to_fit(0, 9, 512) == 9  # under the smallest rung
    assert prefill_to_fit(6, 39, 512) == 39  # 45 pads to 64: a small step, padded
    assert prefill_to_fit(300, 10, 512) == 10  # the rung below (256) holds no prefill token


def test_longest_first_starts_long_programs_before_short_ones():
    shapes = all_shapes(max_num_seqs=8, max_num_batched_tokens=512, pages_per_seq=32,
                        min_decode_rows=2, burst=4)
    order = longest_first(shapes)
    assert sorted(order) == sorted(shapes)
    kinds = ["logprobs" if s.prompt_logprobs else "decode" if s.decode_only else "mixed"
             for s in order]
    # every prompt-logprob program, then every mixed one, then the decode ones
    assert kinds == sorted(kinds, key=["logprobs", "mixed", "decode"].index)
    mixed = [s.num_tokens for s, kind in zip(order, kinds, strict=True) if kind == "mixed"]
    assert mixed == sorted(mixed, reverse=True) and order[0].num_tokens == 512
