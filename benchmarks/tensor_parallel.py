"""Tensor-parallel decode: the Llama-3.1-8B-shaped model (random bf16 weights) split over 1, 2
and 4 devices, timed in one run on one host.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python benchmarks/tensor_parallel.py \\
        --sizes=1,2,4 --output=benchmarks/results/tensor_parallel_h100x4.json

Each size decodes `--batches` requests after a 128-token prompt; a step is timed as the
difference between generating 16 and 112 tokens (prefill and compilation cancel). On CPU,
`XLA_FLAGS=--xla_force_host_platform_device_count=4 ... --model=tiny-random` checks the script.
"""

from __future__ import annotations

import gc
import time

import jax
import numpy as np
from absl import app, flags, logging
from report import header, write

from dendrite_jax import LLM, SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3.1-8b", "Model preset.")
flags.DEFINE_list("sizes", ["1", "2", "4"], "tensor_parallel_size values (those that fit the "
                  "devices present run).")
flags.DEFINE_list("batches", ["1", "32"], "Concurrent requests.")
flags.DEFINE_string("output", "benchmarks/results/tensor_parallel.json", "JSON output.")

SHORT, LONG = 16, 112


def decode_row(tp: int, batch: int) -> dict:
    dtype = "bfloat16" if jax.default_backend() != "cpu" else "float32"
    llm = LLM(model=FLAGS.model, dtype=dtype, tensor_parallel_size=tp, max_num_seqs=batch,
              max_num_batched_tokens=2048, max_model_len=512, kv_cache_bytes=2 * 2**30,
              warmup=False)
    ids = np.random.default_rng(batch).integers(3, min(30000, llm.config.vocab_size),
                                                (batch, 128)).tolist()
    params = {t: SamplingParams(max_tokens=t, temperature=0, ignore_eos=True)
              for t in (SHORT, LONG)}
    llm.generate(ids, params[LONG])  # compiles
    runs = {SHORT: [], LONG: []}
    for _ in range(2):
        for t in (LONG, SHORT):
            start = time.perf_counter()
            llm.generate(ids, params[t])
            runs[t].append(time.perf_counter() - start)
    step = (min(runs[LONG]) - min(runs[SHORT])) / (LONG - SHORT)
    row = {"tensor_parallel_size": tp, "batch": batch, "ms_per_step": step * 1e3,
           "tokens_per_s": batch / step}
    logging.info("%s", row)
    del llm
    gc.collect()
    return row


def main(argv: list[str]) -> None:
    del argv
    report = header("tensor_parallel", model=FLAGS.model,
                    devices=[str(d.device_kind) for d in jax.devices()])
    rows = report["decode"] = []
    for batch in [int(b) for b in FLAGS.batches]:
        for tp in [int(s) for s in FLAGS.sizes if int(s) <= len(jax.devices())]:
            rows.append(decode_row(tp, batch))
            base = next(r for r in rows if r["batch"] == batch)
            rows[-1]["speed_vs_tp1"] = rows[-1]["tokens_per_s"] / base["tokens_per_s"]
            write(report, FLAGS.output)
    for r in rows:
        print(f"tp {r['tensor_parallel_size']} batch {r['batch']:>3}: {r['ms_per_step']:7.2f} "
              f"ms/step {r['tokens_per_s']:8.0f} tok/s ({r['speed_vs_tp1']:.2f}x tp 1)")


if __name__ == "__main__":
    app.run(main)
