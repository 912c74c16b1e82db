"""Bad input never crashes, stalls or misleads the server (issue 27), on SmolLM2: every bad request
is a 4xx in OpenAI's error body naming its field, a request that fails on its own (a constraint
breaking mid-generation, a chat template) ends alone with a one-line error, the front door
(API key, content type, Host, body size) refuses before a route runs, /health stays fast while
a large body is refused or a long prompt admitted, and random JSON bodies against every route
never get a 5xx, leave pages in use or stop the server."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading
import time

import httpx
import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from dendrite_jax import LLM
from dendrite_jax.serve import create_app
from dendrite_jax.serve.guard import default_allowed_hosts, host_name
from tests.helpers import SMOLLM
from tests.serve.live_server import uvicorn_server

MODEL = "smollm2-135m"
CHAT = [{"role": "user", "content": "Name a fruit."}]
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def llm():
    return LLM(**SMOLLM, max_num_seqs=4, max_num_batched_tokens=128, max_model_len=256,
               enable_prefix_caching=False, compilation_cache=False)


@contextlib.contextmanager
def serve(llm, **kwargs):
    """A TestClient over a fresh app (its own engine thread, stopped on leaving)."""
    app = create_app(llm, **kwargs)
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        yield client
        wait_idle(app, llm)


def wait_idle(app, llm, timeout: float = 60.0) -> None:
    """Until no request is pending and no KV page is in use."""
    deadline = time.time() + timeout
    while app.state.engine.pending or llm.engine.pool.stats().used:
        assert time.time() < deadline, "requests or pages were left behind"
        time.sleep(0.02)


def assert_error(response: httpx.Response, status: int, param: str | None = None,
                 message: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and message in error["message"]
    assert "\n" not in error["message"]
    return error


def raw(**fields) -> str:
    """A JSON body written by hand, so it can hold what `json.dumps` refuses to."""
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"


# ----------------------------------------------------------------------- bad request bodies

@pytest.mark.parametrize("route,body,param,message", [
    ("completions", raw(model='"m"', prompt='"a \\ud800 b"'), "prompt", "lone surrogate"),
    ("chat/completions", raw(model='"m"', messages='[{"role": "user", "content": "\\udfff"}]'),
     "messages[0].content", "lone surrogate"),
    ("completions", raw(model='"m"', prompt='"hi"', temperature="Infinity"), "temperature",
     "finite"),
    ("completions", raw(model='"m"', prompt='"hi"', repetition_penalty="NaN"),
     "repetition_penalty", "finite"),
    ("completions", raw(model='"m"', prompt='"hi"', top_p="1e999"), "top_p", "finite"),
    ("chat/completions", raw(model='"m"', messages=json.dumps(CHAT), max_completion_tokens=0),
     "max_completion_tokens", "positive integer"),
    ("completions", raw(model='"m"', prompt='"hi"', temperature='"a"'), "temperature",
     "must be a number"),
    ("completions", raw(model='"m"', prompt='"hi"', temperature="true"), "temperature",
     "must be a number"),
    ("completions", raw(model='"m"', prompt='"hi"', top_k="1.5"), "top_k", "integer"),
    ("completions", raw(model='"m"', prompt='"hi"', stop="[1]"), "stop", "strings"),
    ("completions", raw(model='"m"', prompt='"hi"', max_tokens="true"), "max_tokens",
     "positive integer"),
    ("completions", raw(model='"m"', prompt='"hi"', top_p="7"), "top_p", "top_p"),
    ("completions", raw(model='"m"', prompt='"hi"', regex='"a"', choice='["b"]'), "regex",
     "at most one"),
    ("completions", raw(model='"m"', prompt="[1, 2, 99999999999]"), "prompt", "token ids"),
    ("completions", raw(model='"m"', prompt="[" * 200 + "]" * 200), "prompt", "nests deeper"),
    ("completions", raw(model='"m"', prompt='"hi"', seed="1" * 5000), None, "not valid JSON"),
    ("completions", '"just a string"', None, "JSON object"),
])
def test_bad_values_are_400s_naming_the_field(llm, route, body, param, message):
    body = body.replace('"m"', f'"{MODEL}"')
    with serve(llm) as client:
        assert_error(client.post(f"/v1/{route}", content=body, headers=JSON), 400, param,
                     message)


def test_a_prompt_longer_than_the_context_is_refused_untokenised(llm):
    with serve(llm) as client:
        response = client.post("/v1/completions", json={"model": MODEL,
                                                         "prompt": "word " * 200_000})
        assert_error(response, 400, "prompt", "characters")
        response = client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "word " * 200_000}]})
        assert_error(response, 400, "messages", "characters")


def test_unknown_routes_and_methods_answer_in_openai_shape(llm):
    with serve(llm) as client:
        assert_error(client.get("/v1/nowhere"), 404)
        assert_error(client.get("/v1/completions"), 405)


# ------------------------------------------------------------- failures inside one request

REGEX_THAT_BREAKS = "(a{1000}){1000}"  # llguidance's lexer gives up a few tokens in


def test_a_constraint_breaking_mid_generation_fails_its_request_with_a_400(llm):
    body = {"model": MODEL, "prompt": "Say a:", "max_tokens": 8, "temperature": 0,
            "regex": REGEX_THAT_BREAKS}
    with serve(llm) as client:
        error = assert_error(client.post("/v1/completions", json=body), 400, "regex",
                             "broke the constraint")
        assert error["code"] == "request_failed" and len(error["message"]) <= 300
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200  # the headers went out before the constraint broke
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert events[-1]["error"]["param"] == "regex"
        assert "\n" not in events[-1]["error"]["message"]
        assert client.get("/health").json() == {"status": "ok"}


def test_a_chat_template_error_is_a_one_line_400(llm, monkeypatch):
    def broken(*args, **kwargs):
        raise jinja2.exceptions.TemplateSyntaxError("unexpected '}'\n  {{ x }}}\n     ^", 3)
    monkeypatch.setattr(llm.tokenizer, "apply_chat_template", broken)
    with serve(llm) as client:
        assert_error(client.post("/v1/chat/completions", json={"model": MODEL,
                                                               "messages": CHAT}),
                     400, "messages", "chat template")


def test_a_slow_chat_template_times_out_without_stalling_the_server(llm, monkeypatch):
    """A render past its time limit answers 422, and /health answers while the render is
    still running (it is let go only 10 s later: an event loop it held could not answer)."""
    started, release = threading.Event(), threading.Event()

    def slow(*args, **kwargs):
        started.set()
        release.wait(30)
        return [1, 2, 3]

    monkeypatch.setattr(llm.tokenizer, "apply_chat_template", slow)
    letting_go = threading.Timer(10, release.set)
    with serve(llm, template_timeout_s=0.2) as client:
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": CHAT})))
        thread.start()
        letting_go.start()
        try:
            assert started.wait(30), "the template was never rendered"
            assert client.get("/health").status_code == 200
            assert not release.is_set()  # answered while the render still runs
            thread.join()
        finally:
            release.set()
            letting_go.cancel()
        error = assert_error(result["r"], 422, "messages", "did not render")
        assert error["code"] == "template_timeout"


# --------------------------------------------------------------------------- front door

def test_api_key_is_required_on_v1_routes(llm):
    with serve(llm, api_key="s3cret") as client:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"},
                        {"authorization": "Basic s3cret"}):
            error = assert_error(client.get("/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key"
        assert_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}),
                     401)
        good = {"authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=good).status_code == 200
        ok = client.post("/v1/completions", headers=good,
                         json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200  # probes need no key


@pytest.mark.parametrize("headers", [
    {"content-type": "text/plain", "origin": "http://evil.example"},
    {"content-type": "application/x-www-form-urlencoded"},
    {"content-type": "multipart/form-data; boundary=x"},
    {},
])
def test_a_post_that_is_not_json_gets_415(llm, headers):
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2})
    with serve(llm) as client:
        error = assert_error(client.post("/v1/completions", content=body, headers=headers), 415)
        assert error["code"] == "unsupported_media_type"
        ok = client.post("/v1/completions", content=body,
                         headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200


def test_allowed_hosts_default_to_localhost_names_on_loopback(llm):
    assert default_allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "::1"]
    assert default_allowed_hosts("::1") == ["localhost", "127.0.0.1", "::1"]
    assert default_allowed_hosts("localhost") == ["localhost", "127.0.0.1", "::1"]
    assert default_allowed_hosts("0.0.0.0") == ["*"]
    assert default_allowed_hosts("10.1.2.3") == ["*"]
    assert [host_name(h) for h in ("[::1]:8000", "LocalHost:80", "::1", "a.b")] == [
        "::1", "localhost", "::1", "a.b"]
    with serve(llm, allowed_hosts=default_allowed_hosts("127.0.0.1")) as client:
        for host in ("localhost:8000", "127.0.0.1:8000", "[::1]:8000", "localhost"):
            assert client.get("/health", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "localhost.evil.example", ""):
            error = assert_error(client.get("/v1/models", headers={"host": host}), 400)
            assert error["code"] == "invalid_host"
    with serve(llm, allowed_hosts=["*.example.com"]) as client:
        assert client.get("/health", headers={"host": "api.example.com"}).status_code == 200
        assert client.get("/health", headers={"host": "example.org"}).status_code == 400


def test_an_oversized_body_is_413_before_it_is_read_whole(llm):
    body = json.dumps({"model": MODEL, "prompt": "x" * 2000}).encode()
    with serve(llm, max_body_bytes=1000) as client:
        error = assert_error(client.post("/v1/completions", content=body, headers=JSON), 413)
        assert error["code"] == "request_too_large"

        def chunks():  # no Content-Length: counted as it streams in
            for i in range(0, len(body), 100):
                yield body[i:i + 100]
        assert_error(client.post("/v1/completions", content=chunks(), headers=JSON), 413)
        small = client.post("/v1/completions", headers=JSON, content=json.dumps(
            {"model": MODEL, "prompt": "hi", "max_tokens": 2}))
        assert small.status_code == 200


# ------------------------------------------------------------------ /health under pressure

def health_latencies(base: str, load, count: int = 200) -> list[float]:
    """/health answer times (s) while `load(client)` runs over and over on another thread."""
    stop = threading.Event()

    def loop():
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                load(client, base)
    worker = threading.Thread(target=loop)
    worker.start()
    times = []
    try:
        time.sleep(0.2)
        with httpx.Client(timeout=30) as client:
            for _ in range(count):
                start = time.perf_counter()
                assert client.get(base + "/health").status_code == 200
                times.append(time.perf_counter() - start)
                time.sleep(0.005)
    finally:
        stop.set()
        worker.join()
    return times


BIG_BODY = b'{"model": "smollm2-135m", "prompt": "' + b"x" * 10_000_000 + b'"}'


def refuse_big_body(client: httpx.Client, base: str) -> None:
    """A 10 MB body, with its length declared and streamed without one."""
    r = client.post(base + "/v1/completions", content=BIG_BODY, headers=JSON)
    assert r.status_code == 413
    chunks = (BIG_BODY[i:i + 65536] for i in range(0, len(BIG_BODY), 65536))
    with contextlib.suppress(httpx.HTTPError):  # the server may close before all is sent
        r = client.post(base + "/v1/completions", content=chunks, headers=JSON)
        assert r.status_code == 413


def test_health_answers_while_10mb_bodies_are_refused(llm):
    """Every /health request is answered while 10 MB bodies are refused over and over (its
    latency is measured by benchmarks/robustness.py, not asserted here)."""
    app = create_app(llm)
    with uvicorn_server(app) as base:
        assert len(health_latencies(base, refuse_big_body, count=50)) == 50


def test_health_answers_while_a_prompt_is_tokenised(llm, monkeypatch):
    """Tokenising runs off the event loop: with an encode held mid-way, /health answers, and
    the request completes once the encode is let go."""
    started, release = threading.Event(), threading.Event()
    encode = llm.tokenizer.encode

    def held(text, *args, **kwargs):
        started.set()
        release.wait(60)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(llm.tokenizer, "encode", held)
    app = create_app(llm)
    body = {"model": MODEL, "prompt": "Name a fruit.", "max_tokens": 2}
    with uvicorn_server(app) as base, concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, base + "/v1/completions", json=body, timeout=120)
        try:
            assert started.wait(60), "the request was never tokenised"
            assert httpx.get(base + "/health", timeout=10).json() == {"status": "ok"}
            assert not pending.done()  # still held inside encode
        finally:
            release.set()
        assert pending.result().status_code == 200
    wait_idle(app, llm)


# ---------------------------------------------------------------------------------- fuzz

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def mostly(valid: st.SearchStrategy, junk: st.SearchStrategy = json_values,
           odds: int = 6) -> st.SearchStrategy:
    """A valid value `odds` times in `odds + 1` (`one_of` would favour the simpler branch)."""
    return st.sampled_from([False] * odds + [True]).flatmap(lambda bad: junk if bad else valid)


# Values a request would plausibly send, mixed with any JSON: the fuzz reaches the engine too.
model = mostly(st.just(MODEL), st.just("gpt-4"))
prompt = st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(-5, 60_000),
                                                              min_size=1, max_size=8))
messages = st.lists(st.fixed_dictionaries({
    "role": mostly(st.sampled_from(["system", "user", "assistant"])),
    "content": mostly(st.text(max_size=40))}), min_size=1, max_size=3)
optional = {
    "temperature": st.floats(-1, 3), "top_p": st.floats(0, 1.5), "top_k": st.integers(-2, 50),
    "min_p": st.floats(0, 1), "seed": st.integers(-1, 2**40), "stream": st.booleans(),
    "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
    "repetition_penalty": st.floats(0, 2), "presence_penalty": st.floats(-3, 3),
    "ignore_eos": st.booleans(), "n": st.integers(1, 2), "logprobs": st.integers(0, 2),
    "best_of": st.integers(1, 3), "echo": st.booleans(), "top_logprobs": st.integers(-1, 3),
    "logit_bias": st.dictionaries(st.sampled_from(["0", "42", "-1", "99999", "x"]),
                                  st.floats(-150, 150), max_size=2),
    "stream_options": st.sampled_from([{"include_usage": True}, {"include_usage": 1}, []]),
    "regex": st.sampled_from(["[a-z]+", "(", "a{2,1}", "\\d{3}"]),
    "choice": st.lists(st.text(max_size=5), max_size=3),
    "grammar": st.sampled_from(['start: "yes" | "no"', "start: ???"]),
    "response_format": st.sampled_from([
        {"type": "json_object"}, {"type": "text"}, {"type": "xml"},
        {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}},
        {"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}]),
}
max_tokens = st.integers(1, 3)  # 0 and -1 come as junk


def request_bodies(required: dict) -> st.SearchStrategy:
    """Bodies with the route's fields mostly valid, a few optional fields (mostly valid),
    unknown fields, and now and then the whole body wrongly nested or not an object."""
    known = st.fixed_dictionaries({k: mostly(v) for k, v in required.items()},
                                  optional={k: mostly(v) for k, v in optional.items()})
    unknown = st.dictionaries(st.text(max_size=8), json_values, max_size=2)
    body = st.builds(lambda extra, fields: {**extra, **fields}, unknown, known)
    return mostly(body, st.one_of(st.lists(body, max_size=2), json_values), odds=8)


bodies = {"/v1/completions": request_bodies({"model": model, "prompt": prompt,
                                             "max_tokens": max_tokens}),
          "/v1/chat/completions": request_bodies({"model": model, "messages": messages,
                                                  "max_completion_tokens": max_tokens})}
ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
          ("GET", "/v1/models"), ("GET", "/health"), ("GET", "/metrics"),
          ("POST", "/v1/models"), ("POST", "/health")]
FUZZ_EXAMPLES = 300


def bounded(body: object) -> object:
    """A generation the fuzz can afford: at most 3 new tokens (max_tokens' own values,
    invalid ones included, are fuzzed through `plausible`)."""
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if _is_large_int(body.get(field)):
                body[field] = 3
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = 3
    return body


def _is_large_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 3


def test_fuzz_random_bodies_against_every_route(llm):
    outcomes: dict[tuple[str, int], int] = {}
    with serve(llm) as client:
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(route=st.sampled_from(ROUTES), data=st.data())
        def check(route, data):
            method, path = route
            body = data.draw(bodies.get(path, json_values))
            content = json.dumps(bounded(body))
            response = client.request(method, path, content=content, headers=JSON)
            key = (path, response.status_code)
            outcomes[key] = outcomes.get(key, 0) + 1
            assert response.status_code < 500, (route, content, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["message"], str) and "\n" not in error["message"]
                assert set(error) == {"message", "type", "param", "code"}
        check()
        assert client.get("/health").json() == {"status": "ok"}
    print(f"fuzz: {FUZZ_EXAMPLES} bodies, answers by route and status {sorted(outcomes.items())}")
    assert llm.engine.pool.stats().used == 0
    for path in ("/v1/completions", "/v1/chat/completions"):  # some reach the engine
        assert outcomes.get((path, 200), 0) > 0, path
