"""OpenAI's sampling fields over HTTP, through the official `openai` client against the real
SmolLM2: n choices (streamed interleaved by index), logprobs equal to `LLM.generate`'s, echo with
prompt logprobs, seed, stop lists, logit_bias, max_completion_tokens, the usage chunk; streamed
and whole answers agree; and the utility routes (/tokenize, /detokenize, /version)."""

from __future__ import annotations

import collections
import math

import httpx
import openai
import pytest

from dendrite_jax import SamplingParams
from dendrite_jax.serve import create_app
from tests.serve.live_server import uvicorn_server

MODEL = "smollm2-135m"
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def server(smollm):
    """The app over the session's SmolLM2, and what `LLM.generate` says first (the engine is
    the server's while it runs)."""
    chat_ids = smollm.tokenizer.apply_chat_template(CHAT, tokenize=True)
    expected = {
        "logprobs": smollm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0,
                                                             logprobs=3))[0],
        "chat_logprobs": smollm.generate([chat_ids], SamplingParams(
            max_tokens=5, temperature=0, logprobs=2))[0],
        "prompt_logprobs": smollm.generate([PROMPT], SamplingParams(
            max_tokens=1, temperature=0, prompt_logprobs=2))[0],
        "n3": smollm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=1.0, seed=7,
                                                       n=3))[0],
    }
    app = create_app(smollm)
    with uvicorn_server(app) as base:
        yield {"base": base, "expected": expected, "tokenizer": smollm.tokenizer,
               "client": openai.OpenAI(base_url=f"{base}/v1", api_key="unused",
                                       max_retries=0)}


def test_n_choices_streamed_interleave_by_index_and_match_the_engine(server):
    client, want = server["client"], server["expected"]["n3"]
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=7, n=3)
    whole = client.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert [c.text for c in whole.choices] == [s.text for s in want.samples]
    assert whole.usage.completion_tokens == sum(len(s.token_ids) for s in want.samples)
    texts, order = collections.defaultdict(str), []
    for chunk in client.completions.create(**args, stream=True):
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        order.append(choice.index)
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]
    first_of = {i: order.index(i) for i in range(3)}
    last_of = {i: len(order) - 1 - order[::-1].index(i) for i in range(3)}
    # every choice starts before another ends: the choices interleave, not one after another
    assert max(first_of.values()) < min(last_of.values())


def test_completion_logprobs_equal_the_engines(server):
    want = server["expected"]["logprobs"]
    out = server["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                              temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == want.text
    for i, (token, entry) in enumerate(zip(want.token_ids, want.logprobs, strict=True)):
        assert math.isclose(lp.token_logprobs[i], entry[token].logprob, abs_tol=1e-5)
        assert lp.tokens[i] == entry[token].decoded_token
        top = sorted((e for e in entry.values() if e.rank <= 3), key=lambda e: e.rank)
        assert list(lp.top_logprobs[i]) == [e.decoded_token for e in top]
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_chat_logprobs_streamed_and_whole_agree_with_the_engine(server):
    want = server["expected"]["chat_logprobs"]
    args = dict(model=MODEL, messages=CHAT, max_completion_tokens=5, temperature=0,
                logprobs=True, top_logprobs=2)
    whole = server["client"].chat.completions.create(**args)
    content = whole.choices[0].logprobs.content
    assert whole.choices[0].message.content == want.text
    assert [c.token for c in content] == [e[t].decoded_token for t, e in
                                          zip(want.token_ids, want.logprobs, strict=True)]
    for c, token, entry in zip(content, want.token_ids, want.logprobs, strict=True):
        assert math.isclose(c.logprob, entry[token].logprob, abs_tol=1e-5)
        assert bytes(c.bytes).decode() == c.token and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
    streamed, text = [], ""
    for chunk in server["client"].chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            streamed += choice.logprobs.content if choice.logprobs else []
    assert text == want.text
    assert [(c.token, round(c.logprob, 5)) for c in streamed] == [
        (c.token, round(c.logprob, 5)) for c in content]


def test_echo_scores_the_prompt(server):
    want = server["expected"]["prompt_logprobs"]
    out = server["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=0,
                                              echo=True, logprobs=2, temperature=0)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None
    ids = want.prompt_token_ids
    for i in range(1, len(ids)):
        assert math.isclose(choice.logprobs.token_logprobs[i],
                            want.prompt_logprobs[i][ids[i]].logprob, abs_tol=1e-5)
    echoed = server["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=3,
                                                 echo=True, temperature=0)
    plain = server["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=3,
                                                temperature=0)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    chunks = server["client"].completions.create(model=MODEL, prompt=PROMPT, max_tokens=3,
                                                 echo=True, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text


def test_the_usage_chunk_ends_the_stream(server):
    args = dict(model=MODEL, messages=CHAT, max_tokens=4, temperature=0)
    whole = server["client"].chat.completions.create(**args)
    chunks = list(server["client"].chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(server["client"].chat.completions.create(**args, stream=True))
    assert all(c.usage is None for c in plain)


def test_seed_stop_logit_bias_and_max_completion_tokens(server):
    client = server["client"]
    sampled = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                         temperature=1.0, seed=11).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                        temperature=0, stop=["zzz", "."])
    assert "." in full.choices[0].text
    assert stopped.choices[0].text == full.choices[0].text.split(".")[0]
    assert stopped.choices[0].finish_reason == "stop"
    colon = server["tokenizer"].encode(":", add_special_tokens=False)[0]
    forced = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3,
                                            temperature=0, logit_bias={str(colon): 100})
    assert forced.choices[0].message.content == ":::"
    short = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=50,
                                           max_completion_tokens=2, temperature=0)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, message", [
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "only allowed with"),
    ({"prompt": "hi", "echo": "yes"}, "'echo' must be a boolean"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "n": 2, "best_of": 1}, "best_of"),
])
def test_bad_fields_are_400_naming_them(server, body, message):
    response = httpx.post(server["base"] + "/v1/completions", json={"model": MODEL, **body})
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_top_logprobs_without_logprobs_is_400(server):
    chat = httpx.post(server["base"] + "/v1/chat/completions", json={
        "model": MODEL, "messages": CHAT, "top_logprobs": 2})
    assert chat.status_code == 400 and "needs 'logprobs'" in chat.json()["error"]["message"]


def test_tokenize_detokenize_and_version(server):
    base, tokenizer = server["base"], server["tokenizer"]
    out = httpx.post(base + "/tokenize", json={"model": MODEL, "prompt": PROMPT,
                                               "return_token_strs": True}).json()
    assert out["tokens"] == tokenizer.encode(PROMPT) and out["count"] == len(out["tokens"])
    assert out["max_model_len"] > 0 and "".join(out["token_strs"]) == PROMPT
    chat = httpx.post(base + "/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(CHAT, tokenize=True)
    back = httpx.post(base + "/detokenize", json={"tokens": out["tokens"]}).json()
    assert back == {"prompt": PROMPT}
    bad = httpx.post(base + "/detokenize", json={"tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(base + "/tokenize", json={"model": "gpt-4", "prompt": "x"}
                      ).status_code == 404
    assert httpx.get(base + "/version").json()["version"]
    (card,) = server["client"].models.list().data
    assert card.id == MODEL and card.max_model_len == out["max_model_len"]
