"""/metrics in Prometheus' text format, under vLLM's metric names, labels and buckets.

vLLM's Grafana dashboards and alerts read this endpoint unchanged: every series carries vLLM's
labels (`model_name`, the served model name, and `engine`, "0"), its counters end in `_total`
and its histograms have vLLM's bucket boundaries (checked against vLLM's
`vllm/v1/metrics/loggers.py`, `PrometheusStatLogger`). Requests count as vLLM counts them: one
per engine request, so each n/best_of sibling counts. Three series have no vLLM equivalent and
keep our prefix: the engine step's latency, the KV pages that only the prefix cache holds, and
the requests the server has admitted. The engine thread keeps the numbers (`ServerCounters`,
`Histogram`); the collector reads them at scrape time.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from dendrite_jax.serve.async_engine import AsyncEngine

# vLLM's bucket boundaries (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Ours: an engine step (one launch: a step or a burst).
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# vLLM's finish reasons (`FINISH_REASON_STRINGS`); each is exported from the start, at 0.
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
LABELS = ["model_name", "engine"]
ENGINE_INDEX = "0"  # vLLM's label for its first (here: only) engine core


def token_buckets(max_model_len: int) -> tuple[int, ...]:
    """vLLM's buckets for token counts: 1, 2, 5, 10, 20, 50, ... up to `max_model_len`."""
    out, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return tuple(out)
            out.append(mantissa * scale)
        scale *= 10


class Histogram:
    """Observations in buckets (non-cumulative counts; the last above every bound) and their
    sum. Written by the engine thread only; read at scrape time."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value` (a bucket's bound is inclusive, as Prometheus')."""
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.sum += value * count

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, observations at most le), the last le "+Inf"."""
        counts, total, out = list(self.counts), 0, []
        for bound, n in zip(self.bounds + (float("inf"),), counts, strict=True):
            total += n
            out.append((floatToGoString(bound), total))
        return out


class _EngineCollector:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.labels = [model_name, ENGINE_INDEX]

    def _one(self, family, value: float):
        family.add_metric(self.labels, value)
        return family

    def _histogram(self, name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=LABELS)
        family.add_metric(self.labels, h.cumulative(), h.sum)
        return family

    def collect(self):
        c, gauge, counter = self.engine.counters, GaugeMetricFamily, CounterMetricFamily
        stats = c.stats
        pool, cache = stats.pool, stats.prefix_cache
        cached_only = cache.cached_only_pages if cache else 0
        yield self._one(gauge("vllm:num_requests_running", "Number of requests in model "
                              "execution batches.", labels=LABELS), stats.running)
        yield self._one(gauge("vllm:num_requests_waiting", "Number of requests waiting to be "
                              "processed.", labels=LABELS), stats.waiting)
        # vLLM counts a cached block that no request holds as free (it is evictable).
        yield self._one(gauge("vllm:kv_cache_usage_perc", "KV-cache usage: pages requests "
                              "hold, over all pages. 1 means 100 percent usage.",
                              labels=LABELS), (pool.used - cached_only) / pool.num_pages)
        yield self._one(gauge("dendrite_kv_cache_cached_perc", "KV pages only the prefix cache "
                              "holds (evictable; free in vllm:kv_cache_usage_perc), over all "
                              "pages.", labels=LABELS), cached_only / pool.num_pages)
        yield self._one(counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms "
                                "of number of queried tokens.", labels=LABELS),
                        cache.lookup_tokens if cache else 0)
        yield self._one(counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of "
                                "number of cached tokens.", labels=LABELS),
                        cache.hit_tokens if cache else 0)
        yield self._one(counter("vllm:num_preemptions", "Cumulative number of preemption from "
                                "the engine.", labels=LABELS), stats.preemptions)
        yield self._one(counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                labels=LABELS), c.prompt_tokens)
        yield self._one(counter("vllm:generation_tokens", "Number of generation tokens "
                                "processed.", labels=LABELS), c.generation_tokens)
        success = counter("vllm:request_success", "Count of successfully processed requests.",
                          labels=LABELS + ["finished_reason"])
        for reason in FINISH_REASONS:
            success.add_metric(self.labels + [reason], c.requests[reason])
        yield success
        yield self._histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", c.ttft)
        yield self._histogram("vllm:inter_token_latency_seconds",
                              "Histogram of inter-token latency in seconds.", c.itl)
        yield self._histogram("vllm:e2e_request_latency_seconds",
                              "Histogram of e2e request latency in seconds.", c.e2e)
        yield self._histogram("vllm:request_queue_time_seconds",
                              "Histogram of time spent in WAITING phase for request.", c.queue)
        yield self._histogram("vllm:request_inference_time_seconds",
                              "Histogram of time spent in RUNNING phase for request.",
                              c.inference)
        yield self._histogram("vllm:request_prefill_time_seconds",
                              "Histogram of time spent in PREFILL phase for request.",
                              c.prefill)
        yield self._histogram("vllm:request_decode_time_seconds",
                              "Histogram of time spent in DECODE phase for request.", c.decode)
        yield self._histogram("vllm:request_prompt_tokens",
                              "Number of prefill tokens processed.", c.request_prompt_tokens)
        yield self._histogram("vllm:request_generation_tokens",
                              "Number of generation tokens processed.",
                              c.request_generation_tokens)
        yield self._histogram("vllm:request_max_num_generation_tokens",
                              "Histogram of maximum number of requested generation tokens.",
                              c.max_generation_tokens)
        yield self._histogram("dendrite_step_seconds", "Engine step latency.", c.step)
        yield self._one(gauge("dendrite_requests_pending", "Requests admitted by the server and "
                              "not yet finished.", labels=LABELS), self.engine.pending)


def registry_for(engine: AsyncEngine, model_name: str | None = None) -> CollectorRegistry:
    """A registry exporting `engine`'s metrics, labelled with `model_name` (the served model
    name; default: the model's own)."""
    registry = CollectorRegistry()
    registry.register(_EngineCollector(engine, model_name or engine.llm.config.name))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
