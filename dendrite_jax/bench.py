"""Benchmarks: decode throughput against Hugging Face transformers in the same run.

    python -m dendrite_jax.bench                       # SmolLM2 on CPU, batch 1 and 8
    python -m dendrite_jax.bench --batch_sizes=1,4,16 --max_tokens=128 --output=out.json

Each batch size runs our engine and transformers `generate` (greedy, same prompts, same
number of new tokens, EOS ignored) after a warm-up of each, and reports tokens/s and the
ratio. Machines are noisy: compare ratios from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model preset or path.")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to time.")
flags.DEFINE_integer("max_tokens", 64, "New tokens per request.")
flags.DEFINE_integer("repeats", 2, "Timed runs per batch size (the best is reported).")
flags.DEFINE_boolean("transformers", True, "Also time Hugging Face transformers generate.")
flags.DEFINE_string("output", "benchmarks/results/decode_cpu.json", "Where to write the JSON.")

PROMPTS = [
    "The capital of France is", "Once upon a time, in a land far away,",
    "The three laws of thermodynamics are", "def quicksort(arr):",
    "My favourite recipe for pancakes is", "The history of Rome begins",
    "In machine learning, a transformer is", "The best way to learn a language is",
]


def _prompts(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def weight_stream_bandwidth() -> float:
    """Bytes/s of an f32 matrix-vector product over 30 separate ~14 MB matrices: the rate a
    batch-1 decode step can stream weights at on this machine."""
    import jax
    import jax.numpy as jnp

    weights = [jax.random.normal(jax.random.PRNGKey(i), (576, 6144), jnp.float32)
               for i in range(30)]
    x = jnp.ones((1, 576), jnp.float32)
    gemv = jax.jit(lambda ws, x: sum((x @ w).sum() for w in ws))
    gemv(weights, x).block_until_ready()
    seconds = _best_time(lambda: gemv(weights, x).block_until_ready(), 10)
    return sum(w.nbytes for w in weights) / seconds


def time_dendrite(model: str, batches: list[int], max_tokens: int, repeats: int) -> dict:
    import jax

    from dendrite_jax import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", max_num_seqs=max(batches))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    results = {}
    for b in batches:
        prompts = _prompts(b)
        llm.generate(prompts, params)  # warm-up: compiles this batch's shapes
        seconds = _best_time(lambda prompts=prompts: llm.generate(prompts, params), repeats)
        results[b] = {"seconds": seconds, "tokens_per_s": b * max_tokens / seconds,
                      "ms_per_step": 1e3 * seconds / max_tokens}
    results["compilations"] = llm.compilations
    results["weight_bytes"] = sum(a.nbytes for a in jax.tree_util.tree_leaves(llm.model.params))
    return results


def time_transformers(model: str, batches: list[int], max_tokens: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from dendrite_jax.config import load_preset
    from dendrite_jax.model.loader import preset_gguf_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = preset_gguf_path(load_preset(model))
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                              dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok.padding_side = "left"
    results = {}
    for b in batches:
        inputs = tok(_prompts(b), return_tensors="pt", padding=True)

        def run(inputs=inputs):
            with torch.no_grad():
                hf.generate(**inputs, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                            do_sample=False, pad_token_id=tok.pad_token_id)

        run()
        seconds = _best_time(run, repeats)
        results[b] = {"seconds": seconds, "tokens_per_s": b * max_tokens / seconds}
    return results


def main(argv: list[str]) -> int:
    del argv
    logging.set_verbosity(logging.WARNING)
    import jax

    batches = [int(b) for b in FLAGS.batch_sizes]
    bandwidth = weight_stream_bandwidth()
    ours = time_dendrite(FLAGS.model, batches, FLAGS.max_tokens, FLAGS.repeats)
    floor_ms = 1e3 * ours["weight_bytes"] / bandwidth
    theirs = (time_transformers(FLAGS.model, batches, FLAGS.max_tokens, FLAGS.repeats)
              if FLAGS.transformers else {})
    rows = []
    print(f"\ndecode throughput, {FLAGS.model}, float32, {FLAGS.max_tokens} new tokens, greedy")
    print(f"weights {ours['weight_bytes'] / 1e6:.0f} MB; measured weight-stream bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s -> floor {floor_ms:.1f} ms/step")
    print(f"{'batch':>5} | {'dendrite tok/s':>14} | {'ms/step':>7} | {'of floor':>8} | "
          f"{'transformers tok/s':>18} | {'ratio':>5}")
    for b in batches:
        row = {"batch": b, "dendrite_tokens_per_s": ours[b]["tokens_per_s"],
               "dendrite_ms_per_step": ours[b]["ms_per_step"],
               "floor_fraction": floor_ms / ours[b]["ms_per_step"]}
        if b in theirs:
            row["transformers_tokens_per_s"] = theirs[b]["tokens_per_s"]
            row["ratio"] = ours[b]["tokens_per_s"] / theirs[b]["tokens_per_s"]
        rows.append(row)
        print(f"{b:>5} | {row['dendrite_tokens_per_s']:>14.1f} | {row['dendrite_ms_per_step']:>7.1f} "
              f"| {row['floor_fraction']:>8.0%} "
              f"| {row.get('transformers_tokens_per_s', float('nan')):>18.1f} "
              f"| {row.get('ratio', float('nan')):>5.2f}")
    report = {
        "benchmark": "decode_throughput", "model": FLAGS.model, "dtype": "float32",
        "max_tokens": FLAGS.max_tokens, "date": time.strftime("%Y-%m-%d"),
        "device": str(jax.devices()[0]), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "jax": jax.__version__, "python": sys.version.split()[0],
        "compilations": ours["compilations"], "weight_bytes": ours["weight_bytes"],
        "weight_stream_bandwidth_bytes_per_s": bandwidth, "floor_ms_per_step": floor_ms,
        "rows": rows,
    }
    out = Path(FLAGS.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    app.run(main)
