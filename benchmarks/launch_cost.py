"""What launching a decode step costs the host, apart from the device's time.

    python benchmarks/launch_cost.py --model=llama-3.2-1b --batch=64

Host microseconds per call: the plan upload; the executable call with the device idle (its own
cost: arguments, the CUDA graph's update and launch) and with calls queued back to back (there
the call blocks once the device's launch queue is full, so it reads as the device's step time);
a trivial executable with as many arguments. Also the wall time per step of back-to-back calls
(the device's pace). Writes JSON.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from report import header, write

from dendrite_jax import LLM, SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3.2-1b", "Model preset or path.")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_integer("batch", 64, "Concurrent requests.")
flags.DEFINE_integer("calls", 200, "Calls per variant.")
flags.DEFINE_string("out", "", "JSON output path (default: results/launch_cost_<platform>.json).")


def decode_plan(llm: LLM, batch: int):
    """A decode-only plan the engine launched while generating (and its compiled shape)."""
    runner, seen = llm.engine.runner, []
    launch = runner.launch

    def recording(plan, mask=None):
        if plan.shape.decode_only and plan.shape.num_seqs >= batch:
            seen.append(plan)
        return launch(plan, mask)

    runner.launch = recording
    ids = [[int(t) for t in np.random.default_rng(i).integers(100, 1000, 128)]
           for i in range(batch)]
    llm.generate(ids, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    runner.launch = launch
    return seen[-1]


def per_call(fn, calls: int) -> float:
    """Mean host seconds of fn(), synchronised only at the end (every result kept alive until
    then, as the engine keeps a step's outputs until it reads them back)."""
    outs, start = [], time.perf_counter()
    for _ in range(calls):
        outs.append(out := fn())
    host = (time.perf_counter() - start) / calls
    jax.block_until_ready(out)
    return host


def main(argv: list[str]) -> None:
    del argv
    llm = LLM(model=FLAGS.model, dtype=FLAGS.dtype, max_num_seqs=FLAGS.batch,
              max_num_batched_tokens=2048, max_model_len=512, kv_cache_bytes=2 * 2**30,
              warmup=False)
    runner = llm.engine.runner
    plan = decode_plan(llm, FLAGS.batch)
    compiled = runner.compile(plan.shape)
    host_buffer = plan.pack()
    mask = runner._device_mask(plan.shape.num_seqs, None)
    fixed_buffer = jax.device_put(host_buffer)
    leaves = len(jax.tree.leaves((runner.params, runner.kv, runner.slots, runner.automata)))

    def call(buffer):
        out, runner.kv, runner.slots = compiled(runner.params, runner.kv, runner.slots, buffer,
                                                mask, runner.automata)
        return out

    rows = {}
    rows["device_put plan"] = per_call(lambda: jax.device_put(host_buffer), FLAGS.calls)
    idle = []
    for _ in range(FLAGS.calls):
        start = time.perf_counter()
        out = call(fixed_buffer)
        idle.append(time.perf_counter() - start)
        jax.block_until_ready(out)
    rows["call, device idle before each"] = float(np.median(idle))
    rows["put + call, queued back to back"] = per_call(
        lambda: call(jax.device_put(host_buffer)), FLAGS.calls)

    # Device time per step: back-to-back calls, one sync.
    jax.block_until_ready(call(fixed_buffer))
    start = time.perf_counter()
    for _ in range(FLAGS.calls):
        out = call(fixed_buffer)
    jax.block_until_ready(out)
    rows["wall per step, back to back"] = (time.perf_counter() - start) / FLAGS.calls

    # A trivial executable with as many arguments: the cost of arguments alone.
    args = [jnp.zeros((4,), jnp.float32) for _ in range(leaves)]
    trivial = jax.jit(lambda *xs: xs[0] + 1).lower(*args).compile()
    rows[f"trivial call, {leaves} arguments"] = per_call(lambda: trivial(*args), FLAGS.calls)
    one = jax.jit(lambda x: x + 1).lower(args[0]).compile()
    rows["trivial call, 1 argument"] = per_call(lambda: one(args[0]), FLAGS.calls)

    print(f"{FLAGS.model} batch {FLAGS.batch}, shape {plan.shape}, {leaves} array arguments")
    for name, seconds in rows.items():
        print(f"  {name:48s} {seconds * 1e6:9.1f} µs")
    report = header("launch_cost", model=FLAGS.model, batch=FLAGS.batch, arguments=leaves,
                    microseconds={k: v * 1e6 for k, v in rows.items()})
    out = FLAGS.out or f"{__file__.rsplit('/', 1)[0]}/results/launch_cost_{jax.default_backend()}.json"
    print(write(report, out))


if __name__ == "__main__":
    app.run(main)
