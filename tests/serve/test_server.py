"""The OpenAI-compatible server, driven by the official `openai` client against a uvicorn server
started here on localhost, serving the real SmolLM2: completions and chat equal the engine's own
greedy output, streaming, structured output, concurrent requests, a disconnect that frees its
pages, malformed requests (4xx naming the problem), a full queue (503) and /metrics."""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.serve import create_app
from tests.helpers import SMOLLM
from tests.serve.live_server import uvicorn_server

PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def server():
    llm = LLM(**SMOLLM, max_num_seqs=4,
              max_num_batched_tokens=256, max_model_len=1024, enable_prefix_caching=True,
              compilation_cache=False)
    greedy = SamplingParams(max_tokens=8, temperature=0)
    expected = {
        "completion": llm.generate([PROMPT], greedy)[0].text,
        "chat": llm.generate([llm.tokenizer.apply_chat_template(CHAT, tokenize=True)],
                             greedy)[0].text,
    }
    app = create_app(llm, max_pending=3)
    with uvicorn_server(app) as base:
        yield {"base": base, "llm": llm, "expected": expected, "engine": app.state.engine,
               "client": openai.OpenAI(base_url=f"{base}/v1", api_key="unused",
                                       max_retries=0)}


def wait_idle(server, timeout=30.0) -> None:
    """Until the server has no request and every page is free again (or cached)."""
    engine = server["llm"].engine
    deadline = time.time() + timeout
    # Idle, the only pages in use are the prefix cache's.
    while server["engine"].pending or (engine.pool.stats().used
                                       != engine.prefix_cache.stats().cached_pages):
        assert time.time() < deadline, "requests or pages were left behind"
        time.sleep(0.05)


def test_models_and_health(server):
    models = server["client"].models.list()
    assert [m.id for m in models.data] == ["smollm2-135m"]
    assert httpx.get(server["base"] + "/health").json() == {"status": "ok"}


def test_completion_equals_engine_output(server):
    out = server["client"].completions.create(model="smollm2-135m", prompt=PROMPT,
                                              max_tokens=8, temperature=0)
    choice = out.choices[0]
    assert choice.text == server["expected"]["completion"]
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 0


def test_chat_equals_engine_output(server):
    out = server["client"].chat.completions.create(model="smollm2-135m", messages=CHAT,
                                                   max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == server["expected"]["chat"]


def test_streaming_matches_whole_response(server):
    stream = server["client"].completions.create(model="smollm2-135m", prompt=PROMPT,
                                                 max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == server["expected"]["completion"]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    chat = list(server["client"].chat.completions.create(model="smollm2-135m", messages=CHAT,
                                                         max_tokens=8, temperature=0,
                                                         stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chat)
    assert text == server["expected"]["chat"]
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chat[:-1])
    assert all(c.object == "chat.completion.chunk" and c.id == chat[0].id for c in chat)
    # A stop string of two tokens: the first is generated (not yet streamed) before it matches.
    count = dict(model="smollm2-135m", prompt="Count from one to ten in words: one, two, three,",
                 max_tokens=20, temperature=0, stop=", six")
    whole = server["client"].completions.create(**count).choices[0]
    chunks = list(server["client"].completions.create(**count, stream=True))
    assert whole.finish_reason == "stop" and whole.text.endswith("five")
    assert "".join(c.choices[0].text for c in chunks) == whole.text


def test_streams_that_end_at_end_of_text(server):
    """An answer that ends with end-of-text (the model's usual ending) closes its stream with a
    chunk that carries no text, only `finish_reason="stop"`: a server dropping that chunk, or
    its finish_reason, leaves the client without an ending."""
    chat = dict(model="smollm2-135m", messages=CHAT, max_tokens=64, temperature=0)
    whole = server["client"].chat.completions.create(**chat).choices[0]
    assert whole.finish_reason == "stop" and whole.message.content  # ended well before 64
    chunks = list(server["client"].chat.completions.create(**chat, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1
    prompt = server["llm"].tokenizer.apply_chat_template(CHAT, tokenize=True)
    done = dict(model="smollm2-135m", prompt=prompt, max_tokens=64, temperature=0)
    text = server["client"].completions.create(**done).choices[0]
    chunks = list(server["client"].completions.create(**done, stream=True))
    assert text.finish_reason == chunks[-1].choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in chunks) == text.text == whole.message.content
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_json_schema_response_format(server):
    schema = {"type": "object", "properties": {"fruit": {"type": "string", "maxLength": 12},
                                               "count": {"type": "integer", "minimum": 1,
                                                         "maximum": 9}},
              "required": ["fruit", "count"], "additionalProperties": False}
    out = server["client"].chat.completions.create(
        model="smollm2-135m", messages=CHAT, max_tokens=40, temperature=0.7, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "f", "schema": schema}})
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_concurrent_requests_are_batched_and_correct(server):
    def one(_):
        return server["client"].completions.create(model="smollm2-135m", prompt=PROMPT,
                                                   max_tokens=8, temperature=0).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(one, range(3)))
    assert texts == [server["expected"]["completion"]] * 3
    wait_idle(server)


def test_disconnect_aborts_and_frees_pages(server):
    before = server["engine"].counters.requests["abort"]
    with httpx.stream("POST", server["base"] + "/v1/completions", timeout=60, json={
            "model": "smollm2-135m", "prompt": PROMPT, "max_tokens": 500, "temperature": 0,
            "ignore_eos": True, "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # leaving the block closed the connection mid-stream
    deadline = time.time() + 30
    while server["engine"].counters.requests["abort"] == before:
        assert time.time() < deadline, "the disconnected request was not aborted"
        time.sleep(0.05)
    wait_idle(server)


@pytest.mark.parametrize("body,status,message", [
    ({"model": "smollm2-135m"}, 400, "'prompt' must be"),
    ({"model": "smollm2-135m", "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": "smollm2-135m", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "smollm2-135m", "prompt": "hi", "n": 0}, 400, "n must be"),
    ({"model": "smollm2-135m", "prompt": "hi", "logprobs": 21}, 400, "'logprobs'"),
    ({"model": "smollm2-135m", "prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"model": "smollm2-135m", "prompt": "hi", "suffix": "!"}, 400, "'suffix'"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ({"model": "smollm2-135m", "prompt": "hi " * 2000}, 400, "context"),
    ({"model": "smollm2-135m", "prompt": "hi", "regex": "("}, 400, "regex"),
])
def test_malformed_requests_get_4xx_naming_the_problem(server, body, status, message):
    response = httpx.post(server["base"] + "/v1/completions", json=body, timeout=60)
    assert response.status_code == status
    assert message in response.json()["error"]["message"]
    if "prompt" not in body:  # the client itself refuses to send this one
        return
    known = {k: v for k, v in body.items() if k != "regex"}
    extra = {k: v for k, v in body.items() if k == "regex"}  # vLLM-style extensions
    with pytest.raises(openai.APIStatusError) as info:
        server["client"].completions.create(**{"max_tokens": 4, **known}, extra_body=extra)
    assert info.value.status_code == status


def test_bad_json_and_bad_chat(server):
    response = httpx.post(server["base"] + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="role"):
        server["client"].chat.completions.create(model="smollm2-135m",
                                                 messages=[{"content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="response_format"):
        server["client"].chat.completions.create(model="smollm2-135m", messages=CHAT,
                                                 response_format={"type": "xml"})


def test_full_queue_answers_503(server):
    """max_pending is 3: three long streams hold the queue; a fourth request is refused."""
    body = {"model": "smollm2-135m", "prompt": PROMPT, "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as client:
        streams = [client.stream("POST", server["base"] + "/v1/completions", json=body)
                   for _ in range(3)]
        responses = [s.__enter__() for s in streams]
        try:
            assert [r.status_code for r in responses] == [200] * 3
            refused = client.post(server["base"] + "/v1/completions",
                                  json={**body, "stream": False, "max_tokens": 4})
            assert refused.status_code == 503
            assert "pending" in refused.json()["error"]["message"]
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    wait_idle(server)


def test_metrics_parse(server):
    """The vLLM-named series parse (their values against a load: tests/serve/test_metrics.py)."""
    server["client"].completions.create(model="smollm2-135m", prompt=PROMPT, max_tokens=4)
    text = httpx.get(server["base"] + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("vllm:request_success", "vllm:generation_tokens", "vllm:prompt_tokens",
                 "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_hits", "dendrite_step_seconds"):
        assert name in families, name
    done = {s.labels["finished_reason"]: s.value for s in families["vllm:request_success"].samples}
    assert done["length"] >= 1
    steps = [s for s in families["dendrite_step_seconds"].samples
             if s.name == "dendrite_step_seconds_count"]
    assert steps and steps[0].value > 0
    assert 0 <= families["vllm:kv_cache_usage_perc"].samples[0].value <= 1
