"""Decode throughput with the layer loop as one `lax.scan` vs unrolled per-layer arrays.

    python benchmarks/layer_loop.py --model=llama-3.2-1b --dtype=bfloat16 --batch_sizes=1,16,64

Backs the `layer_loop="auto"` choice per platform. Random-weight presets take token-id prompts,
so no tokenizer is needed. Prints a table and writes JSON.
"""

from __future__ import annotations

import time

import jax
from absl import app, flags, logging
from report import header, write

from dendrite_jax import LLM, SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "tiny-random", "Model preset.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per request.")
flags.DEFINE_integer("max_tokens", 64, "New tokens per request.")
flags.DEFINE_string("output", "benchmarks/results/layer_loop.json", "JSON output path.")


def time_decode(layer_loop: str, batches: list[int]) -> dict[int, dict[str, float]]:
    total = FLAGS.prompt_len + FLAGS.max_tokens
    llm = LLM(model=FLAGS.model, dtype=FLAGS.dtype, layer_loop=layer_loop,
              max_num_seqs=max(batches), max_model_len=max(total, 256),
              num_pages=max(batches) * (total // 16 + 2) + 16, compilation_cache=False)
    vocab = llm.config.vocab_size
    params = SamplingParams(max_tokens=FLAGS.max_tokens, temperature=0, ignore_eos=True)
    results = {}
    for b in batches:
        prompts = [[(97 * i + 13 * j) % vocab for j in range(FLAGS.prompt_len)] for i in range(b)]
        start = time.perf_counter()
        llm.generate(prompts, params)  # warm-up: compiles
        compile_run = time.perf_counter() - start
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            llm.generate(prompts, params)
            best = min(best, time.perf_counter() - start)
        results[b] = {"tokens_per_s": b * FLAGS.max_tokens / best,
                      "ms_per_step": 1e3 * best / FLAGS.max_tokens,
                      "first_run_seconds": compile_run}
    del llm
    return results


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    batches = [int(b) for b in FLAGS.batch_sizes]
    scan = time_decode("scan", batches)
    unrolled = time_decode("unrolled", batches)
    device = str(jax.devices()[0].device_kind)
    print(f"\n{FLAGS.model} {FLAGS.dtype} on {device}: prompt {FLAGS.prompt_len}, "
          f"{FLAGS.max_tokens} new tokens (ms/step includes prefill)")
    print(f"{'batch':>5} | {'scan ms/step':>12} | {'unrolled ms/step':>16} | "
          f"{'unrolled/scan speed':>19}")
    rows = []
    for b in batches:
        ratio = scan[b]["ms_per_step"] / unrolled[b]["ms_per_step"]
        rows.append({"batch": b, "scan": scan[b], "unrolled": unrolled[b], "unrolled_speedup": ratio})
        print(f"{b:>5} | {scan[b]['ms_per_step']:>12.2f} | {unrolled[b]['ms_per_step']:>16.2f} "
              f"| {ratio:>19.2f}")
    out = write(header("layer_loop", model=FLAGS.model, dtype=FLAGS.dtype,
                       platform=jax.default_backend(), rows=rows), FLAGS.output)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
