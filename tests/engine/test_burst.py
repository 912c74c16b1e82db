"""Decode bursts (several decode steps per launch) give the tokens single steps give, stop
where single steps stop, and burst only when every running request can."""

from __future__ import annotations

import numpy as np
import pytest

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.engine.buckets import all_shapes
from dendrite_jax.engine.request import PENDING
from dendrite_jax.engine.step_plan import StepShape

CONFIG = dict(model="tiny-random", page_size=8, max_num_seqs=4, max_num_batched_tokens=32,
              max_model_len=96, compilation_cache=False, warmup=False)
PROMPTS = [[5, 9, 2], list(range(1, 20)), [7] * 9, [3, 1, 4, 1, 5, 9, 2, 6]]


@pytest.fixture(scope="module")
def llms():
    return {burst: LLM(**CONFIG, decode_burst=burst) for burst in (1, 4)}


def mixed_params() -> list[SamplingParams]:
    """Greedy, seeded sampling with every penalty, top-k with logprobs, and a long greedy
    request that outlives the others (the batch shrinks mid-run)."""
    return [SamplingParams(max_tokens=13, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=21, temperature=0.9, seed=11, presence_penalty=0.5,
                           frequency_penalty=0.3, repetition_penalty=1.2, ignore_eos=True),
            SamplingParams(max_tokens=17, temperature=0.7, top_k=20, seed=5, logprobs=2,
                           ignore_eos=True),
            SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)]


def test_bursts_give_the_tokens_of_single_steps(llms):
    outputs, launches = {}, {}
    for burst, llm in llms.items():
        steps = llm.engine.num_steps
        outputs[burst] = llm.generate(PROMPTS, mixed_params())
        launches[burst] = llm.engine.num_steps - steps
        assert llm.engine.pool.stats().used == 0
    for single, burst in zip(outputs[1], outputs[4], strict=True):
        assert burst.token_ids == single.token_ids
        assert burst.finish_reason == single.finish_reason == "length"
        np.testing.assert_allclose(burst.cumulative_logprob, single.cumulative_logprob,
                                   rtol=1e-5)
    for single, burst in zip(outputs[1][2].logprobs, outputs[4][2].logprobs, strict=True):
        assert burst.keys() == single.keys()
    # Bursts start once the top-k request (the logit sort: no burst variant) has finished; its
    # 17 tokens run one per launch, the long request's last 23 mostly four to a launch.
    assert launches[4] <= launches[1] - 10


def test_a_stop_token_mid_burst_ends_the_request_there(llms):
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    tokens = llms[1].generate([PROMPTS[1]], greedy)[0].token_ids
    # The first token not seen before, well past the first burst: stopping on it ends the
    # request mid-run, wherever the burst boundaries fall.
    index = next(i for i in range(6, 30) if tokens[i] not in tokens[:i])
    stop = SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[tokens[index]])
    for llm in llms.values():
        out = llm.generate([PROMPTS[1], PROMPTS[0]], [stop, greedy])
        assert out[0].token_ids == tokens[:index + 1] and out[0].finish_reason == "stop"
        assert out[1].finish_reason == "length" and len(out[1].token_ids) == 30
        assert llm.engine.pool.stats().used == 0


def test_bursts_wait_for_admissions_and_for_short_requests(llms):
    engine = llms[4].engine
    scheduler = engine.scheduler

    def request(prompt, max_tokens):
        r = engine.make_request(None, prompt, SamplingParams(max_tokens=max_tokens,
                                                             temperature=0, ignore_eos=True))
        engine.add(r)
        return r

    first = request(PROMPTS[0], 20)
    engine.step()  # prefill launched; its token is pending
    assert scheduler.schedule_burst(4) is not None  # one running request, decoding
    engine.drain()
    second = request(PROMPTS[2], 20)
    assert scheduler.schedule_burst(4) is None  # a slot is free for the waiting request
    while second.num_computed < len(second.prompt_ids):
        engine.step()
    engine.drain()
    batch = scheduler.schedule_burst(4)
    assert batch is not None and batch.steps == 4
    assert [r for r, _ in batch.rows] == [first, second]
    for r, _ in batch.rows:  # pages for all four positions, allocated up front
        assert len(r.pages) * engine.cfg.page_size >= r.num_computed + 4
    short = request(PROMPTS[3], 2)
    engine.step()
    engine.drain()
    assert short.num_uncomputed == 1 and not short.can_burst(4) and short.can_burst(1)
    assert scheduler.schedule_burst(4) is None  # the short request has one token left
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.stats().used == 0


def test_pending_placeholders_of_two_bursts_fill_in_order(llms):
    r = llms[1].engine.make_request(None, [1, 2], SamplingParams(max_tokens=20))
    r.add_pending(4)
    r.add_pending(4)
    assert r.num_pending == 8 and r.resolved_output_ids == []
    for token in (10, 11, 12):
        r.append_token(token, 96)
    assert r.output_ids == [10, 11, 12] + [PENDING] * 5 and r.num_pending == 5
    assert r.resolved_output_ids == [10, 11, 12]


def test_burst_shapes_are_decode_only_and_warmed():
    with pytest.raises(ValueError, match="decode-only"):
        StepShape(num_tokens=16, num_seqs=4, pages_per_seq=4, burst=4)
    kwargs = dict(max_num_seqs=4, max_num_batched_tokens=32, pages_per_seq=8)
    shapes = all_shapes(**kwargs, burst=4)
    bursts = {s for s in shapes if s.burst == 4}
    assert all(s.decode_only and not s.prompt_logprobs and not s.needs_sort for s in bursts)
    assert {s.num_seqs for s in bursts} == {1, 2, 4}
    assert len(shapes) == len(all_shapes(**kwargs)) + 3
