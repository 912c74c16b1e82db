"""Device-side durations from a jax.profiler trace (its Perfetto JSON; no TensorBoard needed)."""

from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax


def complete_events(trace_dir: str | Path) -> list[tuple[str, str, float]]:
    """(track group, event name, duration in µs) of every complete event in the newest trace
    under `trace_dir`."""
    trace = max(Path(trace_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(trace) as f:
        events = json.loads(f.read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    return [(names.get(e["pid"], str(e["pid"])), e["name"], e.get("dur", 0))
            for e in events if e.get("ph") == "X"]


def gpu_kernels(fn: Callable[[], object], repeats: int = 3) -> list[tuple[str, float]]:
    """(kernel name, duration in µs) of every GPU kernel over `repeats` traced calls of `fn`
    (compiled and warm; it must block until its results are ready)."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(repeats):
                fn()
        return [(name, dur) for group, name, dur in complete_events(trace_dir)
                if "GPU" in group]


def device_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """Seconds of GPU kernel time per call of `fn` (already compiled and warm; it must block
    until its results are ready), traced over `repeats` calls. Kernel time is what the device
    spent executing, without the launch gaps between kernels that a host-driven chain of short
    kernels leaves."""
    gpu = [dur for _, dur in gpu_kernels(fn, repeats)]
    if not gpu:
        raise RuntimeError("the trace holds no GPU kernels: device time needs a GPU")
    return sum(gpu) / 1e6 / repeats


def kernel_microseconds(fn: Callable[[], object], name: str, repeats: int = 3) -> list[float]:
    """Durations in µs of every GPU kernel called `name` over `repeats` traced calls of `fn`."""
    durations = [dur for kernel, dur in gpu_kernels(fn, repeats) if kernel == name]
    if not durations:
        raise RuntimeError(f"the trace holds no GPU kernel named {name!r}: this needs a GPU")
    return durations
