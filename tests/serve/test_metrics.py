"""/metrics under vLLM's names, labels and histogram buckets, after a small load on the real
SmolLM2 (a completion, a streamed one, a chat, two prompts sharing a prefix with prefix caching
on): every series is there with its type and labels, the buckets are vLLM's, and the counts
agree with the load (one request-level observation per request, one inter-token latency per
token after a request's first, tokens as the responses report them, prefix-cache hits). A
best_of group on a tiny random model counts each of its requests, as vLLM counts siblings."""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.serve import create_app
from dendrite_jax.serve.async_engine import AsyncEngine
from dendrite_jax.serve.metrics import registry_for, render
from tests.helpers import SMOLLM
from tests.serve.live_server import uvicorn_server

MODEL = "smollm2-135m"
MAX_MODEL_LEN = 1024
PROMPT = "The capital of France is"
# Longer than a KV page (16 tokens): the second prompt finds the first's pages in the cache.
SHARED = ("A farmer keeps a small orchard behind the old stone house at the end of the lane, "
          "and every autumn the neighbours come to help with the harvest of")

# vLLM's boundaries, copied from vllm/v1/metrics/loggers.py (PrometheusStatLogger).
TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
        10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
       20.0, 40.0, 80.0]
REQUEST_LATENCY = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
TOKENS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]  # build_1_2_5_buckets(max_model_len)
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": TTFT,
    "vllm:inter_token_latency_seconds": ITL,
    "vllm:e2e_request_latency_seconds": REQUEST_LATENCY,
    "vllm:request_queue_time_seconds": REQUEST_LATENCY,
    "vllm:request_inference_time_seconds": REQUEST_LATENCY,
    "vllm:request_prefill_time_seconds": REQUEST_LATENCY,
    "vllm:request_decode_time_seconds": REQUEST_LATENCY,
    "vllm:request_prompt_tokens": TOKENS,
    "vllm:request_generation_tokens": TOKENS,
    "vllm:request_max_num_generation_tokens": TOKENS,
}
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
COUNTERS = ("vllm:num_preemptions", "vllm:prompt_tokens", "vllm:generation_tokens",
            "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:request_success")
FINISH_REASONS = {"stop", "length", "abort", "error", "repetition"}
LABELS = {"model_name": MODEL, "engine": "0"}


@pytest.fixture(scope="module")
def loaded():
    """The server after the load, idle: (metric families by name, what the responses said,
    the LLM)."""
    llm = LLM(**SMOLLM, max_num_seqs=4, max_num_batched_tokens=256,
              max_model_len=MAX_MODEL_LEN, enable_prefix_caching=True, compilation_cache=False)
    app = create_app(llm)
    with uvicorn_server(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        outs = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                          temperature=0)]
        # Streamed, the same prompt: exactly max_tokens tokens (ignore_eos), the same prompt
        # tokens as the first.
        stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        streamed = [c.choices[0].finish_reason for c in stream if c.choices]
        outs.append(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a fruit."}],
            max_tokens=8, temperature=0))
        for fruit in (" apples", " pears"):  # one after the other: the first fills the cache
            outs.append(client.completions.create(model=MODEL, prompt=SHARED + fruit,
                                                  max_tokens=4, temperature=0))
        _wait_idle(app.state.engine, llm)
        text = httpx.get(base + "/metrics").text
    load = {
        "requests": len(outs) + 1,
        "finish_reasons": [o.choices[0].finish_reason for o in outs] + [streamed[-1]],
        "prompt_tokens": sum(o.usage.prompt_tokens for o in outs) + outs[0].usage.prompt_tokens,
        "generation_tokens": sum(o.usage.completion_tokens for o in outs) + 6,
    }
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return families, load, llm


def _wait_idle(engine, llm, timeout=60.0) -> None:
    """Until nothing is pending and the engine thread has taken its idle snapshot of the
    engine's stats (the one /metrics reads)."""
    deadline = time.time() + timeout
    while engine.pending or engine.counters.stats.steps != llm.engine.num_steps:
        assert time.time() < deadline, "the server did not go idle"
        time.sleep(0.02)


def _value(families, name: str, suffix: str = "") -> float:
    [sample] = [s for s in families[name].samples if s.name == name + suffix]
    return sample.value


def test_every_vllm_series_is_there_with_its_type_and_labels(loaded):
    families, _, _ = loaded
    expected = {**{n: "histogram" for n in HISTOGRAMS}, **{n: "gauge" for n in GAUGES},
                **{n: "counter" for n in COUNTERS}}
    assert {n: families[n].type for n in expected if n in families} == expected
    for name, kind in expected.items():
        for sample in families[name].samples:
            assert {k: sample.labels[k] for k in LABELS} == LABELS, sample
            if kind == "counter":  # exposed as vLLM's: name_total
                assert sample.name == name + "_total", sample
    reasons = {s.labels["finished_reason"] for s in families["vllm:request_success"].samples}
    assert reasons == FINISH_REASONS
    # Ours, where vLLM has none.
    assert families["dendrite_step_seconds"].type == "histogram"
    assert families["dendrite_kv_cache_cached_perc"].type == "gauge"


def test_histogram_buckets_are_vllms(loaded):
    families, _, _ = loaded
    for name, bounds in HISTOGRAMS.items():
        buckets = [s for s in families[name].samples if s.name == name + "_bucket"]
        les = [s.labels["le"] for s in buckets]
        assert les[-1] == "+Inf", name
        assert [float(le) for le in les[:-1]] == bounds, name
        counts = [s.value for s in buckets]
        assert counts == sorted(counts) and counts[-1] == _value(families, name, "_count")


def test_counts_agree_with_the_load(loaded):
    families, load, _ = loaded
    n = load["requests"]
    success = {s.labels["finished_reason"]: s.value
               for s in families["vllm:request_success"].samples}
    expected = {reason: load["finish_reasons"].count(reason) for reason in FINISH_REASONS}
    assert success == expected
    # One observation per request that made a token (all of them here).
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                 "vllm:request_decode_time_seconds", "vllm:request_inference_time_seconds",
                 "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
                 "vllm:request_max_num_generation_tokens"):
        assert _value(families, name, "_count") == n, name
    generated = _value(families, "vllm:generation_tokens", "_total")
    assert generated == load["generation_tokens"]
    assert _value(families, "vllm:request_generation_tokens", "_sum") == generated
    assert _value(families, "vllm:request_max_num_generation_tokens", "_sum") == generated
    prompt = _value(families, "vllm:prompt_tokens", "_total")
    assert prompt == load["prompt_tokens"]
    assert _value(families, "vllm:request_prompt_tokens", "_sum") == prompt
    # Every token after a request's first is one inter-token latency; they add up to the
    # requests' decode time.
    itl = "vllm:inter_token_latency_seconds"
    assert _value(families, itl, "_count") == generated - n
    assert math.isclose(_value(families, itl, "_sum"),
                        _value(families, "vllm:request_decode_time_seconds", "_sum"),
                        rel_tol=1e-6, abs_tol=1e-9)
    ttft = _value(families, "vllm:time_to_first_token_seconds", "_sum")
    assert 0 < ttft <= _value(families, "vllm:e2e_request_latency_seconds", "_sum")
    assert _value(families, "vllm:num_preemptions", "_total") == 0


def test_prefix_cache_and_kv_usage(loaded):
    families, _, llm = loaded
    hits = _value(families, "vllm:prefix_cache_hits", "_total")
    assert hits >= llm.engine.cfg.page_size  # the second shared-prefix prompt's first page
    assert _value(families, "vllm:prefix_cache_queries", "_total") >= hits
    # Idle: no request runs or waits, and every page in use is held by the prefix cache
    # alone, which vLLM counts as free.
    assert _value(families, "vllm:num_requests_running") == 0
    assert _value(families, "vllm:num_requests_waiting") == 0
    assert _value(families, "vllm:kv_cache_usage_perc") == 0
    stats = llm.stats()
    cached = _value(families, "dendrite_kv_cache_cached_perc")
    assert cached == stats.prefix_cache.cached_pages / stats.pool.num_pages > 0


def test_a_group_counts_each_request_and_its_largest_output_once():
    llm = LLM(model="tiny-random", max_num_seqs=4, num_pages=64, compilation_cache=False)
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=3, n=2, best_of=4,
                            ignore_eos=True)

    async def scenario() -> AsyncEngine:
        engine = AsyncEngine(llm)
        try:
            _, deltas = await engine.submit(None, [4, 5, 6], params)
            assert len([d async for d in deltas]) == 2  # the two best, once all four end
            return engine
        finally:
            engine.stop()
    engine = asyncio.run(scenario())
    text = render(registry_for(engine, "tiny")).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {s.labels["model_name"] for f in families.values() for s in f.samples} == {"tiny"}
    success = {s.labels["finished_reason"]: s.value
               for s in families["vllm:request_success"].samples}
    assert success["length"] == 4 and sum(success.values()) == 4  # the candidates not returned
    assert _value(families, "vllm:generation_tokens", "_total") == 4 * 5
    assert _value(families, "vllm:prompt_tokens", "_total") == 4 * 3
    assert _value(families, "vllm:time_to_first_token_seconds", "_count") == 4
    assert _value(families, "vllm:inter_token_latency_seconds", "_count") == 4 * 4
    assert _value(families, "vllm:e2e_request_latency_seconds", "_count") == 4
    # One observation per group: its longest completion.
    assert _value(families, "vllm:request_max_num_generation_tokens", "_count") == 1
    assert _value(families, "vllm:request_max_num_generation_tokens", "_sum") == 5
