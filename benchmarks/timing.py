"""Timing helpers the benchmarks share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    """Median wall seconds of run() (waited on), after one untimed call that compiles."""
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Fewest wall seconds of `repeats` calls of run() (which must block until done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)
