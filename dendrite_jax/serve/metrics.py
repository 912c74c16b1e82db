"""/metrics in Prometheus' text format, read from the engine thread's counters at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from dendrite_jax.serve.async_engine import STEP_BUCKETS, AsyncEngine

PREFIX = "dendrite"


class _EngineCollector:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self):
        c = self.engine.counters
        requests = CounterMetricFamily(f"{PREFIX}_requests", "Requests ended, by outcome "
                                       "(stop, length, abort, error, rejected).",
                                       labels=["outcome"])
        for outcome, count in sorted(c.requests.items()):
            requests.add_metric([str(outcome)], count)
        yield requests
        yield CounterMetricFamily(f"{PREFIX}_prompt_tokens", "Prompt tokens admitted.",
                                  value=c.prompt_tokens)
        yield CounterMetricFamily(f"{PREFIX}_generation_tokens", "Tokens generated.",
                                  value=c.generation_tokens)
        stats = c.stats
        yield GaugeMetricFamily(f"{PREFIX}_requests_waiting", "Requests queued in the engine.",
                                value=stats.waiting)
        yield GaugeMetricFamily(f"{PREFIX}_requests_running", "Requests being decoded.",
                                value=stats.running)
        yield GaugeMetricFamily(f"{PREFIX}_requests_pending", "Requests admitted by the "
                                "server and not yet finished.", value=self.engine.pending)
        yield GaugeMetricFamily(f"{PREFIX}_kv_pages_used", "KV-cache pages in use.",
                                value=stats.pool.used)
        yield GaugeMetricFamily(f"{PREFIX}_kv_pages_total", "KV-cache pages.",
                                value=stats.pool.num_pages)
        yield GaugeMetricFamily(f"{PREFIX}_kv_usage_ratio", "Fraction of KV pages in use.",
                                value=stats.pool.used / max(stats.pool.num_pages, 1))
        hit_rate = stats.prefix_cache.hit_rate if stats.prefix_cache else 0.0
        yield GaugeMetricFamily(f"{PREFIX}_prefix_cache_hit_rate", "Prompt tokens served from "
                                "the prefix cache, over tokens looked up.", value=hit_rate)
        buckets = [(("+Inf" if b == float("inf") else repr(b)), n)
                   for b, n in zip(STEP_BUCKETS, c.step_buckets, strict=True)]
        yield HistogramMetricFamily(f"{PREFIX}_step_seconds", "Engine step latency.",
                                    buckets=buckets, sum_value=c.step_seconds_sum)


def registry_for(engine: AsyncEngine) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(_EngineCollector(engine))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
