"""Where a decode step's time goes: traces a warm `generate` with jax.profiler and prints the
device ops by total time, from the trace's Perfetto JSON (no TensorBoard needed).

    python benchmarks/profile_decode.py --model=llama-3.2-1b --batch=64 --trace_dir=/tmp/trace

Prints one table per device/host track group: op name, calls, total ms, share of the group.
"""

from __future__ import annotations

import collections
import gzip
import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging

from dendrite_jax import LLM, SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3.2-1b", "Model preset or path.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("batch", 64, "Concurrent requests.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per request.")
flags.DEFINE_integer("max_tokens", 32, "Tokens generated in the traced run.")
flags.DEFINE_string("attention_backend", "auto", "Paged attention backend.")
flags.DEFINE_string("trace_dir", "/tmp/decode_trace", "Where the trace goes.")
flags.DEFINE_integer("top", 25, "Ops listed per group.")


def summarize(trace_file: Path, top: int) -> None:
    with gzip.open(trace_file) as f:
        events = json.loads(f.read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    calls: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") != "X":
            continue
        group = names.get(e["pid"], str(e["pid"]))
        groups[group][e["name"]] += e.get("dur", 0) / 1e3
        calls[group][e["name"]] += 1
    for group, totals in groups.items():
        whole = sum(totals.values())
        print(f"\n== {group}: {whole:.1f} ms in {sum(calls[group].values())} events")
        for name, ms in totals.most_common(top):
            print(f"{ms:9.2f} ms {100 * ms / whole:5.1f}% {calls[group][name]:6d}x  {name[:110]}")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    llm = LLM(model=FLAGS.model, dtype=FLAGS.dtype, max_num_seqs=FLAGS.batch,
              max_num_batched_tokens=2048, max_model_len=512, kv_cache_bytes=2 * 2**30,
              warmup=False, attention_backend=FLAGS.attention_backend)
    rng = np.random.default_rng(0)
    vocab = min(llm.config.vocab_size, 30000)
    ids = rng.integers(3, vocab, (FLAGS.batch, FLAGS.prompt_len)).tolist()
    params = SamplingParams(max_tokens=FLAGS.max_tokens, temperature=0, ignore_eos=True)
    llm.generate(ids, params)  # compile
    engine = llm.engine
    steps0, host0, launch0, wait0 = (engine.num_steps, engine.host_seconds,
                                     engine.launch_seconds, engine.wait_seconds)
    start = time.perf_counter()
    llm.generate(ids, params)
    seconds = time.perf_counter() - start
    steps = engine.num_steps - steps0
    print(f"untraced: {seconds * 1e3 / steps:.2f} ms/step; per step, host "
          f"{(engine.host_seconds - host0) * 1e3 / steps:.2f} ms (launch "
          f"{(engine.launch_seconds - launch0) * 1e3 / steps:.2f}), waiting for results "
          f"{(engine.wait_seconds - wait0) * 1e3 / steps:.2f}")
    steps0 = llm.engine.num_steps
    start = time.perf_counter()
    with jax.profiler.trace(FLAGS.trace_dir, create_perfetto_trace=True):
        llm.generate(ids, params)
    seconds = time.perf_counter() - start
    steps = llm.engine.num_steps - steps0
    print(f"{FLAGS.model} batch {FLAGS.batch}: {steps} steps in {seconds * 1e3:.1f} ms traced "
          f"({seconds * 1e3 / steps:.2f} ms/step with tracing on)")
    trace = max(Path(FLAGS.trace_dir).rglob("perfetto_trace.json.gz"),
                key=lambda p: p.stat().st_mtime)
    summarize(trace, FLAGS.top)


if __name__ == "__main__":
    app.run(main)
