"""Timing helpers the benchmarks share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def wall_times(run: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` calls of run(), each waited on."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return times


def median_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    """Median wall seconds of run() (waited on), after one untimed call that compiles."""
    jax.block_until_ready(run())
    return statistics.median(wall_times(run, repeats))


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """Fewest wall seconds of `repeats` calls of run() (waited on)."""
    return min(wall_times(run, repeats))
