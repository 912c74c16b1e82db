"""The public API on the real SmolLM2: prompt forms, sampling, stops, logprobs, errors."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite_jax import LLM, RequestOutput, SamplingParams
from tests.helpers import paged_logits

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def assert_pool_empty(llm: LLM) -> None:
    pool = llm.engine.pool
    pool.check_invariants()
    assert pool.stats().used == 0, "KV pages leaked"


def test_string_and_token_id_prompts_agree(smollm):
    text = "The capital of France is"
    ids = smollm.tokenizer.encode(text)
    by_text, by_ids = smollm.generate([text, ids], GREEDY)
    assert isinstance(by_text, RequestOutput)
    assert by_text.token_ids == by_ids.token_ids and by_text.text == by_ids.text
    assert by_text.prompt == text and by_ids.prompt is None
    assert by_text.prompt_token_ids == ids
    assert "Paris" in by_text.text
    single = smollm.generate(text, GREEDY)  # a bare string is one prompt
    assert len(single) == 1 and single[0].token_ids == by_text.token_ids
    assert_pool_empty(smollm)


def test_seeded_sampling_is_batch_invariant(smollm):
    """The same seeded request gives the same tokens alone and inside a batch of 8 others."""
    target = ("Tell me a story about a dragon.",
              SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234))
    alone = smollm.generate([target[0]], [target[1]])[0]
    others = [(f"Write about topic number {i}.",
               SamplingParams(max_tokens=10 + i, temperature=0.3 * i, top_k=5 * i, seed=i))
              for i in range(7)]
    prompts = [p for p, _ in others[:3]] + [target[0]] + [p for p, _ in others[3:]]
    params = [s for _, s in others[:3]] + [target[1]] + [s for _, s in others[3:]]
    batched = smollm.generate(prompts, params)
    assert batched[3].token_ids == alone.token_ids
    again = smollm.generate([target[0]], [target[1]])[0]
    assert again.token_ids == alone.token_ids
    different_seed = smollm.generate(
        [target[0]], SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=99))[0]
    assert different_seed.token_ids != alone.token_ids
    assert_pool_empty(smollm)


def test_max_tokens_and_length_finish(smollm):
    out = smollm.generate(["Count: 1, 2, 3,"], SamplingParams(max_tokens=5, temperature=0,
                                                               ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_strings_cut_the_text(smollm):
    prompt = "Count from one to ten in words: one, two, three,"
    full = smollm.generate([prompt], SamplingParams(max_tokens=20, temperature=0))[0]
    assert " six" in full.text
    out = smollm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop=" six"))[0]
    assert out.finish_reason == "stop" and out.stop_reason == " six"
    assert out.text == full.text[:full.text.index(" six")]
    kept = smollm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop=[" six"],
                                                    include_stop_str_in_output=True))[0]
    assert kept.text.endswith(" six")


def test_stop_token_ids(smollm):
    prompt = "Count from one to ten in words: one, two, three,"
    full = smollm.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0]
    stop_id = full.token_ids[3]
    out = smollm.generate([prompt], SamplingParams(max_tokens=10, temperature=0,
                                                   stop_token_ids=[stop_id]))[0]
    assert out.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_eos_ends_chat_answers(smollm):
    chat = smollm.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}])
    out = smollm.generate([chat], SamplingParams(max_tokens=64, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == smollm.tokenizer.eos_token_id
    assert "<|im_end|>" not in out.text


def test_logprobs_structure(smollm):
    out = smollm.generate(["The sky is"], SamplingParams(max_tokens=6, temperature=0.8, seed=3,
                                                         logprobs=4))[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert token in entry and 4 <= len(entry) <= 5
        top = sorted((lp for t, lp in entry.items() if lp.rank <= 4), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == [1, 2, 3, 4]
        assert all(a.logprob >= b.logprob for a, b in zip(top, top[1:], strict=False))
        assert entry[token].logprob <= 0
        assert sum(math.exp(lp.logprob) for lp in top) <= 1 + 1e-5
    greedy = smollm.generate(["The sky is"], SamplingParams(max_tokens=4, temperature=0,
                                                            logprobs=0))[0]
    for token, entry in zip(greedy.token_ids, greedy.logprobs, strict=True):
        assert list(entry) == [token] and entry[token].rank == 1


def _reference_penalised_greedy(llm, ids, steps, rep, presence, frequency):
    """Greedy decoding with vLLM's penalty formulae applied in numpy to full logits."""
    model = llm.model
    prompt, out = list(ids), []
    for _ in range(steps):
        logits = paged_logits(model.params, model.config, prompt + out)[-1].astype(np.float64)
        seen = np.zeros_like(logits, bool)
        seen[prompt + out] = True
        logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
        counts = np.bincount(out, minlength=logits.size)[:logits.size] if out else 0
        logits = logits - frequency * counts - presence * (np.asarray(counts) > 0)
        out.append(int(np.argmax(logits)))
    return out


def test_penalties_match_a_host_reference(smollm):
    """Prompt mask and output counts kept on device give the same penalised greedy tokens as
    recomputing the penalties from the token history on the host, for two requests in one
    batch that reuse slots previous requests had."""
    prompts = ["Repeat after me: apple apple apple apple apple", "The cat sat on the mat. The"]
    settings = [(1.8, 0.0, 0.5), (1.3, 0.6, 0.0)]
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=r,
                             presence_penalty=p, frequency_penalty=f) for r, p, f in settings]
    outputs = smollm.generate(prompts, params)
    for prompt, (r, p, f), out in zip(prompts, settings, outputs, strict=True):
        ids = smollm.tokenizer.encode(prompt)
        assert out.token_ids == _reference_penalised_greedy(smollm, ids, 8, r, p, f)
    plain = smollm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0,
                                                        ignore_eos=True))[0]
    assert plain.token_ids != outputs[0].token_ids  # the penalty changed the output


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=-3), "top_k must be"),
    (dict(min_p=2.0), "min_p must be"),
    (dict(max_tokens=0), "max_tokens must be"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logprobs=50), "logprobs must be"),
    (dict(seed=-1), "seed must be"),
    (dict(temperature="a"), "temperature must be a finite number, got 'a'"),
    (dict(temperature=float("inf")), "temperature must be a finite number, got inf"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(max_tokens=True), "max_tokens must be an integer >= 1, got True"),
    (dict(top_k=2.0), "top_k must be an integer"),
    (dict(seed=True), "seed must be a non-negative integer, got True"),
    (dict(logprobs=False), "logprobs must be an integer"),
    (dict(stop_token_ids=[True]), "stop_token_ids must be non-negative integers"),
    (dict(stop="a\ud800"), r"stop\[0\] is not valid Unicode"),
    (dict(stop=5), "stop must be a string or a list of strings, got int"),
    (dict(ignore_eos=1), "ignore_eos must be True or False, got 1"),
    (dict(regex="\udfff"), "regex is not valid Unicode"),
    (dict(choice=["ok", "\ud800"]), r"choice\[1\] is not valid Unicode"),
])
def test_invalid_sampling_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_requests_raise_before_anything_runs(smollm):
    too_long = [1] * 9000
    with pytest.raises(ValueError, match=r"prompt has 9,000 tokens; the model's context is 8,192"):
        smollm.generate(["fine prompt", too_long], GREEDY)
    with pytest.raises(ValueError, match="token ids must be integers"):
        smollm.generate([[1, 2, 10**6]], GREEDY)
    with pytest.raises(ValueError, match="prompt is empty"):
        smollm.generate([""], GREEDY)
    with pytest.raises(ValueError, match="one per prompt"):
        smollm.generate(["a", "b"], [GREEDY])
    with pytest.raises(ValueError, match="prompts must be a string, a list of token ids or a "
                       "list of those, got bytes"):
        smollm.generate(b"hello", GREEDY)
    with pytest.raises(ValueError, match=r"prompts\[0\] must be a string or a list of token "
                       "ids"):
        smollm.generate([True, 1], GREEDY)
    with pytest.raises(ValueError, match=r"prompts\[1\] must be"):
        smollm.generate([[5, 6], [7, False]], GREEDY)
    with pytest.raises(ValueError, match="prompt is not valid Unicode text"):
        smollm.generate("half a pair \ud83d", GREEDY)
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams or a list "
                       "of them, got dict"):
        smollm.generate("hi", {"max_tokens": 3})
    with pytest.raises(ValueError, match="expected SamplingParams, got dict"):
        smollm.add_request("hi", {"max_tokens": 3})
    with pytest.raises(ValueError, match="got bytes"):
        smollm.add_request(b"hi", GREEDY)
    assert not smollm.engine.has_unfinished()
    assert_pool_empty(smollm)


def test_unknown_model_and_bad_engine_settings():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        LLM(model="no-such-model")
    with pytest.raises(ValueError, match="dtype must be one of"):
        LLM(model="tiny-random", dtype="float16")
    with pytest.raises(ValueError, match="unknown attention_backend 'cuda-magic'"):
        LLM(model="tiny-random", attention_backend="cuda-magic")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        LLM(model="tiny-random", max_model_len=10**6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_num_seqs=True), "max_num_seqs must be an integer, got True"),
    (dict(max_num_seqs="8"), "max_num_seqs must be an integer, got '8'"),
    (dict(num_pages=3.0), "num_pages must be an integer, got 3.0"),
    (dict(kv_cache_bytes=-1), "kv_cache_bytes must be positive"),
    (dict(tensor_parallel_size=True), "tensor_parallel_size must be an integer"),
    (dict(enable_prefix_caching=1), "enable_prefix_caching must be True or False"),
    (dict(forced_tokens=None), "forced_tokens must be True or False"),
    (dict(fp8_keep_layers=[0.5]), "fp8_keep_layers must be a list of layer indices"),
])
def test_engine_settings_of_the_wrong_type(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(model="tiny-random", compilation_cache=False, warmup=False, **kwargs)


def test_random_weight_preset_runs_token_prompts():
    llm = LLM(model="tiny-random", max_num_seqs=4, num_pages=64, compilation_cache=False)
    outs = llm.generate([[1, 2, 3], [4, 5, 6, 7, 8]], SamplingParams(max_tokens=5, temperature=0))
    assert [len(o.token_ids) for o in outs] == [5, 5]
    with pytest.raises(ValueError, match="has no tokenizer"):
        llm.generate(["text needs a tokenizer"], GREEDY)


def test_a_failing_step_releases_every_page(monkeypatch):
    llm = LLM(model="tiny-random", num_pages=64, max_num_seqs=2, compilation_cache=False)
    calls = {"n": 0}
    launch = llm.engine.runner.launch

    def flaky(plan, mask=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return launch(plan, mask)

    monkeypatch.setattr(llm.engine.runner, "launch", flaky)
    with pytest.raises(RuntimeError, match="device lost"):
        llm.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=5, temperature=0))
    assert not llm.engine.has_unfinished()
    assert_pool_empty(llm)
    monkeypatch.setattr(llm.engine.runner, "launch", launch)
    outs = llm.generate([[1, 2, 3]] * 3, SamplingParams(max_tokens=5, temperature=0))
    assert all(len(o.token_ids) == 5 for o in outs)  # the engine still serves
    assert_pool_empty(llm)


def test_bfloat16_tracks_float32():
    """The same random model in bfloat16 scores prompt tokens within bf16 rounding of float32."""
    prompt = [[(13 * j) % 500 + 1 for j in range(40)]]
    params = SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=0)
    f32, bf16 = (LLM(model="tiny-random", dtype=d, num_pages=32, compilation_cache=False)
                 .generate(prompt, params)[0] for d in ("float32", "bfloat16"))
    lp32 = np.array([next(iter(e.values())).logprob for e in f32.prompt_logprobs[1:]])
    lp16 = np.array([next(iter(e.values())).logprob for e in bf16.prompt_logprobs[1:]])
    assert np.all(np.isfinite(lp16)) and np.abs(lp16 - lp32).max() < 0.1
    assert np.abs(lp16 - lp32).max() > 0  # it really ran in a different dtype


def test_more_requests_than_slots_and_a_tight_pool():
    """12 requests through 4 slots and a pool that fits only a few at once: all finish, no
    page leaks, same greedy tokens as with room to spare."""
    prompts = [[(7 * i + j) % 500 + 1 for j in range(5 + 3 * i)] for i in range(12)]
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    roomy = LLM(model="tiny-random", max_num_seqs=16, num_pages=256, compilation_cache=False)
    tight = LLM(model="tiny-random", max_num_seqs=4, num_pages=12, page_size=8,
                compilation_cache=False)
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    assert [o.token_ids for o in tight.generate(prompts, params)] == expected
    assert_pool_empty(tight)
    assert tight.engine.pool.stats().high_watermark <= 12
    with pytest.raises(ValueError, match="needs .* KV pages"):
        tight.generate([[1] * 100], SamplingParams(max_tokens=50))


sampling_values = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
    st.text(max_size=4), st.binary(max_size=3), st.lists(st.integers(-2, 5), max_size=3),
    st.sampled_from(["\ud800", [True], ["a", ""], {"k": 1}]))


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(st.sampled_from([
    f.name for f in dataclasses.fields(SamplingParams)]), sampling_values, max_size=3))
def test_fuzzed_sampling_params(fields):
    """Random values of every type for random fields: ValueError, or params whose numbers
    are finite and of their type."""
    try:
        params = SamplingParams(**fields)
    except ValueError:
        return
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        value = getattr(params, name)
        assert not isinstance(value, bool) and math.isfinite(value), name
    for name in ("max_tokens", "top_k", "n"):
        value = getattr(params, name)
        assert isinstance(value, int) and not isinstance(value, bool), name
    assert all(isinstance(s, str) and s for s in params.stop)
