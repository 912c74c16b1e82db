"""GPU kernel time of the on-device sampler (`engine.sampling.sample`) at one batch of logits.

    python benchmarks/sampling_time.py --batch=64 --vocab=128256 \\
        --output=benchmarks/results/sampling_time.json

Greedy and sampled rows (temperature 0.8), no truncation: the step's sampling section without
penalties. Each variant is chained 20 times in one jit (the inputs passed through an
optimisation barrier so nothing is hoisted) and timed by kernel time from a profiler trace
(`trace_events.device_seconds`). GPU only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags
from jax import lax
from report import header, write
from trace_events import device_seconds

from dendrite_jax.engine.sampling import SamplingBatch, sample

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 64, "Rows of logits.")
flags.DEFINE_integer("vocab", 128256, "Vocabulary size (Llama 3's by default).")
flags.DEFINE_string("output", "benchmarks/results/sampling_time.json", "JSON output path.")

CALLS = 20


def rows(batch: int, temperature: float) -> SamplingBatch:
    def full(value: float) -> jax.Array:
        return jnp.full((batch,), value, jnp.float32)

    return SamplingBatch(full(temperature), jnp.zeros((batch,), jnp.int32), full(1.0),
                         full(0.0), full(1.0), full(0.0), full(0.0),
                         jnp.arange(batch, dtype=jnp.uint32))


def microseconds_per_call(logits: jax.Array, settings: SamplingBatch,
                          positions: jax.Array) -> float:
    @jax.jit
    def chained(logits, settings, positions):
        def body(_, acc):
            args, acc = lax.optimization_barrier(((logits, settings, positions), acc))
            return acc + sample(*args, truncate=False).sum()
        return lax.fori_loop(0, CALLS, body, jnp.int32(0))

    def run() -> None:
        jax.block_until_ready(chained(logits, settings, positions))

    run()
    return device_seconds(run) / CALLS * 1e6


def main(argv: list[str]) -> None:
    del argv
    logits = jax.random.normal(jax.random.key(1), (FLAGS.batch, FLAGS.vocab), jnp.float32) * 3
    positions = jnp.arange(FLAGS.batch, dtype=jnp.int32) + 200
    report = header("sampling_time", batch=FLAGS.batch, vocab=FLAGS.vocab)
    for name, temperature in (("greedy", 0.0), ("sampled", 0.8)):
        report[f"{name}_us"] = microseconds_per_call(logits, rows(FLAGS.batch, temperature),
                                                     positions)
        print(f"{name:8s} {report[f'{name}_us']:7.1f} µs per call")
    print(f"wrote {write(report, FLAGS.output)}")


if __name__ == "__main__":
    app.run(main)
