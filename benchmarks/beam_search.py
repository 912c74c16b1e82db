"""Beam search against the same work as independent requests.

    python benchmarks/beam_search.py                  # SmolLM2 on CPU

For each width w: beam search over `--prompts` prompts of `--prompt_len` tokens, `--max_tokens`
new tokens, against w independent greedy requests per prompt (what beam search replaces
naively: w sequences of the same length). Reports generated sequence-tokens per second (beams
x steps) and the most KV pages held at once by each.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags, logging
from report import header, write

from dendrite_jax import LLM, BeamSearchParams, SamplingParams

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model preset or path.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_list("widths", ["2", "4", "8"], "Beam widths.")
flags.DEFINE_integer("prompts", 2, "Prompts searched together.")
flags.DEFINE_integer("prompt_len", 256, "Prompt tokens.")
flags.DEFINE_integer("max_tokens", 32, "New tokens per sequence.")
flags.DEFINE_string("output", "benchmarks/results/beam_search_cpu.json", "JSON output.")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    widths = [int(w) for w in FLAGS.widths]
    llm = LLM(model=FLAGS.model, dtype=FLAGS.dtype, max_num_seqs=FLAGS.prompts * max(widths),
              warmup=False)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(100, 20000, FLAGS.prompt_len)]
               for _ in range(FLAGS.prompts)]
    report = header("beam_search", model=FLAGS.model, dtype=FLAGS.dtype,
                    prompt_len=FLAGS.prompt_len, max_tokens=FLAGS.max_tokens,
                    prompts=FLAGS.prompts, rows=[])
    for w in widths:
        params = BeamSearchParams(beam_width=w, max_tokens=FLAGS.max_tokens,
                                  early_stopping="never", length_penalty=0.0)
        llm.beam_search(prompts, params)  # compile
        start = time.perf_counter()
        outs = llm.beam_search(prompts, params)
        beam_s = time.perf_counter() - start
        independent = [p for p in prompts for _ in range(w)]
        greedy = SamplingParams(max_tokens=FLAGS.max_tokens, temperature=0, ignore_eos=True)
        llm.generate(independent, greedy)
        start = time.perf_counter()
        llm.generate(independent, greedy)
        indep_s = time.perf_counter() - start
        sequence_tokens = FLAGS.prompts * w * FLAGS.max_tokens
        pages = sum(o.max_pages_in_use for o in outs)
        page = llm.engine.cfg.page_size
        indep_pages = len(independent) * -(-(FLAGS.prompt_len + FLAGS.max_tokens) // page)
        report["rows"].append({
            "width": w, "beam_seconds": beam_s, "independent_seconds": indep_s,
            "beam_tokens_per_s": sequence_tokens / beam_s,
            "independent_tokens_per_s": sequence_tokens / indep_s,
            "beam_max_pages": pages, "independent_pages": indep_pages})
    out = write(report, FLAGS.output)
    print(f"\nbeam search, {FLAGS.model} on {report['device']}: {FLAGS.prompts} prompts x "
          f"{FLAGS.prompt_len} tokens, {FLAGS.max_tokens} new")
    print("width | beam tok/s  independent tok/s  ratio | pages: beams  independent")
    for r in report["rows"]:
        print(f"{r['width']:5d} | {r['beam_tokens_per_s']:10.0f} {r['independent_tokens_per_s']:18.0f} "
              f"{r['beam_tokens_per_s'] / r['independent_tokens_per_s']:6.2f} | "
              f"{r['beam_max_pages']:12d} {r['independent_pages']:12d}")
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
