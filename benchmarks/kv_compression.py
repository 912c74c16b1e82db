"""KV-cache compression: storage and distortion of each compressor, and quality on SmolLM2.

    python benchmarks/kv_compression.py                       # all parts, CPU (~17 min)
    python benchmarks/kv_compression.py --parts=compressors   # the storage table only

Parts:
- compressors: bits per element (every code array, norms and packing included) and ratio vs
  bfloat16 at head_dim 64 and 128; squared error on random unit vectors; inner-product error
  E[(<q, x> - <q, x_hat>)^2] * d for unit q, x (so 1 means "as large as a typical <q, x>").
- perplexity: SmolLM2 on a long English text (Python's own reference documentation,
  `pydoc_data.topics`), each token's logprob read through the (compressed) cache.
- greedy: agreement of greedy continuations with the uncompressed cache's, token by token.
- needle: a number hidden mid-way in filler text, asked for at the end, at several lengths.
Writes JSON (results/kv_compression_cpu.json by default).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from quality import GREEDY_PROMPTS, long_text, perplexity
from report import header, write

from dendrite_jax import LLM, SamplingParams
from kernels_pallas.codecs.kv import compression_ratio, make_kv_compression

FLAGS = flags.FLAGS
flags.DEFINE_list("parts", ["compressors", "perplexity", "greedy", "needle"], "What to run.")
flags.DEFINE_list("caches", ["none", "fp8", "polarquant-4", "turboquant-mse-4", "turboquant-4",
                             "turboquant-3", "qjl-256"],
                  "Cache compressions for the SmolLM2 parts.")
flags.DEFINE_integer("perplexity_tokens", 1024, "Tokens of text scored.")
flags.DEFINE_list("needle_lengths", ["512", "1024"],
                  "Haystack lengths (tokens; SmolLM2's context is 8192, and on 2 CPU cores a "
                  "4096-token haystack takes minutes per cache).")
flags.DEFINE_string("output", "benchmarks/results/kv_compression_cpu.json", "JSON output.")

COMPRESSORS = ["polarquant-2", "polarquant-4", "polarquant-8", "qjl-128", "qjl-256",
               "turboquant-2", "turboquant-3", "turboquant-4", "turboquant-mse-3",
               "turboquant-mse-4"]


def compressor_rows() -> list[dict]:
    rows = []
    rng = np.random.default_rng(1234)
    for head_dim in (64, 128):
        x = rng.standard_normal((4000, head_dim))
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        q = rng.standard_normal((4000, head_dim))
        q /= np.linalg.norm(q, axis=-1, keepdims=True)
        for name in COMPRESSORS:
            c = make_kv_compression(name, head_dim)[0]  # the key compressor of that name
            x_hat = np.asarray(c.decode(c.encode(jnp.asarray(x, jnp.float32))), np.float64)
            ip_error = np.sum(q * (x_hat - x), axis=-1)
            rows.append({"compressor": name, "head_dim": head_dim,
                         "bits_per_element": c.bits_per_element(),
                         "ratio_vs_bf16": compression_ratio(c),
                         "mse_unit": float(np.mean(np.sum((x - x_hat) ** 2, axis=-1))),
                         "ip_error_x_d": float(np.mean(ip_error ** 2) * head_dim),
                         "ip_bias_x_sqrt_d": float(np.mean(ip_error) * np.sqrt(head_dim))})
    return rows


def make_llm(cache: str, max_model_len: int = 8192) -> LLM:
    return LLM(model="smollm2-135m", dtype="float32", kv_compression=cache, max_num_seqs=8,
               max_num_batched_tokens=512, max_model_len=max_model_len)


def needle_prompt(tokenizer, length: int, secret: str) -> list[int]:
    filler = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
              "There and back again. ")
    needle = f" The secret number is {secret}. Remember it. "
    question = "\n\nWhat is the secret number? The secret number is"
    filler_ids = tokenizer.encode(filler)
    budget = length - len(tokenizer.encode(needle)) - len(tokenizer.encode(question))
    body = (filler_ids * (budget // len(filler_ids) + 1))[:budget]
    half = len(body) // 2
    return (body[:half] + tokenizer.encode(needle) + body[half:]
            + tokenizer.encode(question))


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    report = header("kv_compression", model="smollm2-135m")
    if "compressors" in FLAGS.parts:
        report["compressors"] = compressor_rows()
        print(f"{'compressor':18s} {'hd':>4s} {'bits/elt':>9s} {'vs bf16':>8s} "
              f"{'mse(unit)':>10s} {'ip err·d':>9s}")
        for r in report["compressors"]:
            print(f"{r['compressor']:18s} {r['head_dim']:4d} {r['bits_per_element']:9.3f} "
                  f"{r['ratio_vs_bf16']:7.2f}x {r['mse_unit']:10.4f} {r['ip_error_x_d']:9.4f}")
        write(report, FLAGS.output)
    smollm_parts = [p for p in FLAGS.parts if p != "compressors"]
    if not smollm_parts:
        return
    report["smollm2"] = {}
    reference_tokens = None
    for cache in FLAGS.caches:
        start = time.perf_counter()
        llm = make_llm(cache)
        row = {"pages": llm.engine.pool.num_pages}
        if "perplexity" in smollm_parts:
            row["perplexity"] = perplexity(llm, long_text(llm.tokenizer, FLAGS.perplexity_tokens))
        if "greedy" in smollm_parts:
            outs = llm.generate(GREEDY_PROMPTS, SamplingParams(max_tokens=32, temperature=0))
            got = [o.token_ids for o in outs]
            if reference_tokens is None:
                reference_tokens = got
            same = [sum(a == b for a, b in zip(g, r, strict=False)) / max(len(r), 1)
                    for g, r in zip(got, reference_tokens, strict=True)]
            first = [next((i for i, (a, b) in enumerate(zip(g, r, strict=False)) if a != b),
                          min(len(g), len(r))) for g, r in zip(got, reference_tokens, strict=True)]
            row["greedy_agreement"] = float(np.mean(same))
            row["greedy_first_divergence_mean"] = float(np.mean(first))
        if "needle" in smollm_parts:
            found = {}
            for length in [int(n) for n in FLAGS.needle_lengths]:
                secrets = ["73914", "28561", "90417"]
                # The answer's 8 tokens must fit the context too.
                fit = min(length, llm.engine.max_model_len - 8)
                prompts = [needle_prompt(llm.tokenizer, fit, s) for s in secrets]
                outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0))
                found[str(length)] = sum(s in o.text for s, o in zip(secrets, outs, strict=True))
            row["needle_found_of_3"] = found
        row["seconds"] = time.perf_counter() - start
        report["smollm2"][cache] = row
        print(cache, row, flush=True)
        write(report, FLAGS.output)
        del llm
        jax.clear_caches()


if __name__ == "__main__":
    app.run(main)
