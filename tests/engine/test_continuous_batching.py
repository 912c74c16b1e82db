"""Continuous batching on a tiny random model: random request streams with arrivals, aborts
and a small pool end cleanly, leak no pages, compile nothing after warm-up, and give each
request the greedy tokens it gets when run alone."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.engine.request import RequestStatus

CONFIG = dict(model="tiny-random", page_size=8, max_num_seqs=4, max_num_batched_tokens=16,
              max_model_len=64, compilation_cache=False)
POOL_PAGES = 12  # 4 slots x up to 8 pages each would need 32: the pool runs dry, often


@pytest.fixture(scope="module")
def warmed():
    """Two warmed-up engines sharing nothing: prefix caching off and on. The first runs decode
    bursts of 3 steps where it can, so every stream run on the second (single steps) is also
    checked against burst results (`alone` uses the first)."""
    llms = {flag: LLM(**CONFIG, num_pages=POOL_PAGES, enable_prefix_caching=flag, warmup=True,
                      decode_burst=1 if flag else 3)
            for flag in (False, True)}
    assert all(llm.engine.runner.frozen for llm in llms.values())
    return llms


@pytest.fixture(scope="module")
def alone(warmed):
    """Greedy tokens of one request served by itself (memoised)."""
    llm, memo = warmed[False], {}

    def run(prompt: tuple[int, ...], max_tokens: int) -> list[int]:
        key = (prompt, max_tokens)
        if key not in memo:
            memo[key] = llm.generate([list(prompt)], SamplingParams(
                max_tokens=max_tokens, temperature=0, ignore_eos=True))[0].token_ids
        return memo[key]

    return run


SHARED = [7, 3, 9, 1, 4, 4, 2, 8, 5, 5, 6, 1, 2, 3, 9, 9]  # two pages many prompts start with

request_strategy = st.tuples(
    st.booleans(),  # starts with the shared prefix
    st.lists(st.integers(1, 500), min_size=1, max_size=30),  # own tokens (prompt <= 46)
    st.integers(1, 10),  # max_tokens
    st.integers(0, 6),  # arrival step
    st.one_of(st.none(), st.integers(0, 12)),  # abort after this many steps
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request_strategy, min_size=1, max_size=8), prefix_caching=st.booleans())
def test_random_streams(warmed, alone, requests, prefix_caching):
    llm = warmed[prefix_caching]
    engine = llm.engine
    compilations = llm.compilations
    pending = sorted(enumerate(requests), key=lambda item: item[1][3])
    live = {}
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][1][3] <= step:
            index, (shared, own, max_tokens, _, abort_after) = pending.pop(0)
            prompt = (SHARED if shared else []) + own
            r = engine.make_request(None, prompt, SamplingParams(
                max_tokens=max_tokens, temperature=0, ignore_eos=True))
            engine.add(r)
            live[index] = (r, step + abort_after if abort_after is not None else None)
        for r, abort_at in live.values():
            if abort_at is not None and abort_at <= step and not r.finished:
                engine.abort(r.request_id)
        if engine.has_unfinished():
            engine.step()
        step += 1
        assert step < 500, "requests did not finish"

    assert llm.compilations == compilations  # nothing compiled after warm-up
    for r, _ in live.values():
        assert r.finished
        if r.status is RequestStatus.DONE:
            assert r.output_ids == alone(tuple(r.prompt_ids), r.params.max_tokens)
        else:
            assert r.status is RequestStatus.ABORTED and r.finish_reason == "abort"
    pool = engine.pool
    pool.check_invariants()
    cached = engine.prefix_cache.stats().cached_pages if engine.prefix_cache else 0
    assert pool.stats().used == cached  # every page is free or pinned by the prefix cache
    if engine.prefix_cache:
        engine.prefix_cache.evict_lru(pool.num_pages)
        assert pool.stats().used == 0


def test_preemption_under_pressure_keeps_greedy_outputs(warmed, alone):
    """Lazily allocated pages run out mid-decode: the youngest request is preempted and
    recomputed, and every output is still the one it gets alone."""
    llm = warmed[False]
    before = llm.stats().preemptions
    prompts = [[(11 * i + j) % 500 + 1 for j in range(12 + 5 * i)] for i in range(4)]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    stats = llm.stats()
    assert stats.preemptions > before
    assert [o.token_ids for o in outputs] == [alone(tuple(p), 20) for p in prompts]
    assert stats.pool.used == 0 and stats.pool.high_watermark <= POOL_PAGES


def test_penalties_survive_preemption(warmed):
    """Output counts are rebuilt when a preempted request is recomputed."""
    llm = warmed[False]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                            repetition_penalty=1.5, frequency_penalty=0.7)
    prompts = [[(11 * i + j) % 500 + 1 for j in range(12 + 5 * i)] for i in range(4)]
    one_by_one = [llm.generate([p], params)[0].token_ids for p in prompts]
    before = llm.stats().preemptions
    together = llm.generate(prompts, params)
    assert llm.stats().preemptions > before
    assert [o.token_ids for o in together] == one_by_one


def test_penalties_with_prefix_caching(warmed):
    """A request admitted with a cached prefix starts mid-sequence in a slot another request
    used: its penalty state must still start clean (and repetition penalties see the whole
    prompt). Outputs equal those of the engine without caching."""
    shared = SHARED + [11, 12, 13, 14, 15, 16, 17, 18]
    prompts = [shared + [20 + i, 30 + i, 40 + i] for i in range(6)]
    for penalty in (dict(frequency_penalty=1.5, presence_penalty=0.5),
                    dict(repetition_penalty=1.7)):
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, **penalty)
        plain = [warmed[False].generate([p], params)[0].token_ids for p in prompts]
        cached = [warmed[True].generate([p], params)[0].token_ids for p in prompts]
        assert cached == plain


def test_warmup_then_guard_raises_on_new_shapes(warmed):
    from dendrite_jax.engine.runner import RecompileError
    from dendrite_jax.engine.step_plan import StepShape

    with pytest.raises(RecompileError, match="not compiled at warm-up"):
        warmed[False].engine.runner.compile(StepShape(num_tokens=24, num_seqs=3,
                                                      pages_per_seq=4))


def test_sampling_variants_are_warmed_up(warmed):
    """Truncated sampling and logprobs run the step's sorting variant: compiled at warm-up."""
    llm = warmed[False]
    before = llm.compilations
    outs = llm.generate([[4, 5, 6], [7, 8, 9, 10]],
                        [SamplingParams(max_tokens=4, temperature=0.8, top_p=0.9, seed=1),
                         SamplingParams(max_tokens=4, temperature=0, logprobs=2)])
    assert len(outs[1].logprobs[0]) >= 2 and all(len(o.token_ids) == 4 for o in outs)
    assert all(lp.rank >= 1 for lp in outs[1].logprobs[0].values())  # ranked by the sort
    assert llm.compilations == before


def test_chunked_prefill_mixes_with_decodes(warmed, alone):
    """A long prompt arriving while others decode is split into chunks that share steps with
    the decode rows."""
    engine = warmed[False].engine
    short = engine.make_request(None, [5, 6, 7], SamplingParams(max_tokens=40, temperature=0,
                                                                ignore_eos=True))
    engine.add(short)
    engine.step()  # prefill of the short prompt
    long_prompt = [(3 * j) % 500 + 1 for j in range(56)]
    long = engine.make_request(None, long_prompt, SamplingParams(max_tokens=3, temperature=0,
                                                                 ignore_eos=True))
    engine.add(long)
    sizes = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        batch = schedule()
        sizes.append(sorted(n for _, n in batch.rows))
        return batch

    engine.scheduler.schedule = recording_schedule
    try:
        while not long.finished:
            engine.step()
    finally:
        engine.scheduler.schedule = schedule
    mixed = sum(1 for s in sizes if s and s[0] == 1 and s[-1] > 1)
    assert mixed >= 2  # 56 tokens in chunks of at most 15 beside a decode row
    assert all(sum(s) <= CONFIG["max_num_batched_tokens"] for s in sizes)
    engine.abort(short.request_id)
    engine.drain()
    assert long.output_ids == alone(tuple(long_prompt), 3)
