"""Where a decode step's time goes: traces a warm `generate` with jax.profiler and prints the
device ops by total time, from the trace's Perfetto JSON (no TensorBoard needed).

    python benchmarks/profile_decode.py --model=llama-3.2-1b --batch=64 --trace_dir=/tmp/trace

Prints one table per device/host track group: op name, calls, total ms, share of the group.
"""

from __future__ import annotations

import collections
import contextlib
import re
import time

import jax
import numpy as np
from absl import app, flags, logging
from trace_events import complete_events

from dendrite_jax import LLM, SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3.2-1b", "Model preset or path.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("batch", 64, "Concurrent requests.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per request.")
flags.DEFINE_integer("max_tokens", 32, "Tokens generated in the traced run.")
flags.DEFINE_string("attention_backend", "auto", "Paged attention backend.")
flags.DEFINE_string("kv_compression", "none", "KV-cache compression (as LLM takes it).")
flags.DEFINE_string("weights_dtype", None, "Weight quantization (as LLM takes it).")
flags.DEFINE_float("kv_cache_gib", 2, "KV-cache size.")
flags.DEFINE_string("trace_dir", "/tmp/decode_trace", "Where the trace goes.")
flags.DEFINE_integer("top", 25, "Ops listed per group.")
flags.DEFINE_bool("explain", False, "Also print what each listed device op computes: its HLO "
                  "instruction and the ops of its fused computation.")


def hlo_ops(hlo_text: str) -> dict[str, str]:
    """Instruction name -> one line saying what it computes (for a fusion: its kind, output
    shape and the op counts of the computation it calls)."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.-]+) .*\{$", line)
        if header:
            current = header.group(1)
            computations[current] = []
        elif current is not None and "=" in line:
            computations[current].append(line.strip())
    described = {}
    for lines in computations.values():
        for line in lines:
            m = re.match(r"^(?:ROOT )?%?([\w.-]+) = (\S+) ", line)
            if not m:
                continue
            name, shape = m.groups()
            called = re.search(r"calls=%?([\w.-]+)", line)
            kind = re.search(r"kind=(\w+)", line)
            ops = collections.Counter()
            for inner in computations.get(called.group(1), []) if called else []:
                op = re.match(r"^(?:ROOT )?%?[\w.-]+ = \S+ ([\w-]+)\(", inner)
                if op and op.group(1) not in ("parameter", "constant", "bitcast"):
                    ops[op.group(1)] += 1
            inner_ops = " ".join(f"{op}x{n}" if n > 1 else op for op, n in ops.most_common(8))
            described[name] = f"{kind.group(1) if kind else ''} {shape[:60]} {inner_ops}"
    return described


def summarize(trace_dir: str, top: int, explain: dict[str, str] | None = None) -> None:
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    calls: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for group, name, dur in complete_events(trace_dir):
        groups[group][name] += dur / 1e3
        calls[group][name] += 1
    for group, totals in groups.items():
        whole = sum(totals.values())
        print(f"\n== {group}: {whole:.1f} ms in {sum(calls[group].values())} events")
        for name, ms in totals.most_common(top):
            print(f"{ms:9.2f} ms {100 * ms / whole:5.1f}% {calls[group][name]:6d}x  {name[:110]}")
            if explain and name in explain and "GPU" in group:
                print(f"{'':28}{explain[name][:150]}")


@contextlib.contextmanager
def timed_launch_parts(engine):
    """Seconds spent in each part of `runner.launch`: the upload, the executable call (which
    launches the step's CUDA graph) and the asynchronous copy back."""
    parts = collections.Counter()
    runner = engine.runner
    original_put, original_compiled = jax.device_put, dict(runner._compiled)

    def timed(name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            parts[name] += time.perf_counter() - start
            return result
        return call

    jax.device_put = timed("device_put", original_put)
    runner._compiled.update({s: timed("execute", c) for s, c in original_compiled.items()})
    try:
        yield parts
    finally:
        jax.device_put = original_put
        runner._compiled.update(original_compiled)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    llm = LLM(model=FLAGS.model, dtype=FLAGS.dtype, max_num_seqs=FLAGS.batch,
              max_num_batched_tokens=2048, max_model_len=max(512, FLAGS.prompt_len + FLAGS.max_tokens),
              kv_cache_bytes=int(FLAGS.kv_cache_gib * 2**30), warmup=False,
              attention_backend=FLAGS.attention_backend, kv_compression=FLAGS.kv_compression,
              weights_dtype=FLAGS.weights_dtype)
    rng = np.random.default_rng(0)
    vocab = min(llm.config.vocab_size, 30000)
    ids = rng.integers(3, vocab, (FLAGS.batch, FLAGS.prompt_len)).tolist()
    params = SamplingParams(max_tokens=FLAGS.max_tokens, temperature=0, ignore_eos=True)
    llm.generate(ids, params)  # compile
    engine = llm.engine
    steps0, host0, launch0, wait0 = (engine.num_steps, engine.host_seconds,
                                     engine.launch_seconds, engine.wait_seconds)
    start = time.perf_counter()
    with timed_launch_parts(engine) as parts:
        llm.generate(ids, params)
    seconds = time.perf_counter() - start
    steps = engine.num_steps - steps0
    print("launch parts, ms per step: " + ", ".join(
        f"{name} {total * 1e3 / steps:.3f}" for name, total in parts.items()))
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
    explain = None
    if FLAGS.explain:
        explain = {}
        # Op names repeat across executables: explain the widest decode-only step's.
        decode = [(shape.num_seqs, kind, compiled)
                  for (shape, kind), compiled in llm.engine.runner._compiled.items()
                  if shape.decode_only]
        for _, _, compiled in sorted(decode, key=lambda d: d[0]):
            explain.update(hlo_ops(compiled.as_text()))
    summarize(FLAGS.trace_dir, FLAGS.top, explain)


if __name__ == "__main__":
    app.run(main)
