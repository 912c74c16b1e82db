"""Serving on the real SmolLM2: shared-prefix reuse, streaming, abort and stats."""

from __future__ import annotations

import pytest

from dendrite_jax import LLM, SamplingParams
from tests.helpers import SMOLLM
from tests.model.test_smollm_parity import LONG_TEXT

GREEDY = SamplingParams(max_tokens=8, temperature=0)
QUESTIONS = ["Who invented it?", "When did it start?", "Why did it matter?", "Name a city.",
             "What came before?", "Was it fast?", "Who read the books?", "What is ink?"]


@pytest.fixture(scope="module")
def cached_llm():
    return LLM(**SMOLLM, enable_prefix_caching=True,
               max_num_seqs=16, max_num_batched_tokens=512, num_pages=1024)


def test_shared_system_prompt_is_computed_once(smollm, cached_llm):
    # 8 questions after a 256-token system prompt (the uncached reference run below prefills
    # every prompt in full: its cost sets this test's length)
    n, length = len(QUESTIONS), 256
    system = cached_llm.tokenizer.encode(LONG_TEXT * 2)[:length]
    prompts = [system + cached_llm.tokenizer.encode("\nQuestion: " + q + "\nAnswer:")
               for q in QUESTIONS]
    assert all(p[:length] == system for p in prompts)
    with_cache = cached_llm.generate(prompts, GREEDY)
    stats = cached_llm.stats().prefix_cache
    page = 16
    assert stats.tokens_saved >= (n - 1) * length - n * page
    without_cache = smollm.generate(prompts, GREEDY)
    assert [o.token_ids for o in with_cache] == [o.token_ids for o in without_cache]
    pool = cached_llm.stats().pool
    assert pool.used == cached_llm.stats().prefix_cache.cached_pages  # only the cache holds pages
    # A later request with the same system prompt reuses it too, and so does a repeat whose
    # whole prompt is cached (its last token is recomputed into a copied page).
    saved = stats.tokens_saved
    again = cached_llm.generate([prompts[3]], GREEDY)[0]
    assert again.token_ids == with_cache[3].token_ids
    assert cached_llm.stats().prefix_cache.tokens_saved - saved >= length


def test_a_repeat_whose_whole_prompt_is_cached(smollm, cached_llm):
    """A prompt of whole pages, repeated: every page is in the cache, and the repeat still
    computes its last token (into a copy of the last page) to sample its first one."""
    page = 16
    prompt = cached_llm.tokenizer.encode("A short story. " + LONG_TEXT)[:3 * page]
    first = cached_llm.generate([prompt], GREEDY)[0]
    saved = cached_llm.stats().prefix_cache.tokens_saved
    again = cached_llm.generate([prompt], GREEDY)[0]
    assert again.token_ids == first.token_ids == smollm.generate([prompt], GREEDY)[0].token_ids
    assert cached_llm.stats().prefix_cache.tokens_saved - saved == 3 * page - 1
    pool = cached_llm.stats().pool
    assert pool.used == cached_llm.stats().prefix_cache.cached_pages  # nothing leaked


def test_stream_yields_text_deltas(smollm):
    reference = smollm.generate(["The capital of France is"],
                                SamplingParams(max_tokens=16, temperature=0))[0]
    deltas = list(smollm.stream("The capital of France is",
                                SamplingParams(max_tokens=16, temperature=0)))
    assert len(deltas) >= 8  # incremental, not one final chunk
    assert "".join(d.text for d in deltas) == reference.text
    assert [t for d in deltas for t in d.token_ids] == reference.token_ids
    assert deltas[-1].finish_reason == reference.finish_reason
    assert deltas[-1].output.text == reference.text
    assert all(d.finish_reason is None for d in deltas[:-1])


def test_stream_several_and_close_early_frees_pages(smollm):
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    stream = smollm.stream(["One", "Two", "Three"], params)
    ids = {next(stream).request_id for _ in range(4)}
    assert len(ids) >= 2
    stream.close()  # the consumer went away: its requests are aborted
    assert not smollm.engine.has_unfinished()
    assert smollm.stats().pool.used == 0


def test_abort_a_queued_and_a_running_request(smollm):
    engine = smollm.engine
    keep = smollm.add_request("Tell me about the sea.", SamplingParams(max_tokens=12,
                                                                       temperature=0))
    drop = smollm.add_request("Tell me about the sky.", SamplingParams(max_tokens=50,
                                                                       temperature=0))
    engine.step()  # both admitted and prefilled
    assert smollm.abort(drop) and not smollm.abort(drop)
    assert not smollm.abort("no-such-id")
    while engine.has_unfinished():
        engine.step()
    assert smollm.stats().pool.used == 0 and smollm.engine.requests == {}
    assert keep not in engine.requests  # finished and released


def test_stats_fields(smollm):
    smollm.generate(["Hello"], GREEDY)
    stats = smollm.stats()
    assert stats.compilations == smollm.compilations > 0
    assert stats.pool.num_pages > 0 and stats.pool.high_watermark > 0
    assert stats.prefix_cache is None  # caching is off for this engine
    assert stats.steps > 0 and stats.waiting == stats.running == 0
