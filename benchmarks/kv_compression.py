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
- greedy_long: the same for 8 prompts of 512 tokens of the long text (at different offsets):
  the short prompts of `greedy` fit a full-precision window whole, these do not.
- needle: a number hidden mid-way in filler text, asked for at the end, at several lengths.
Writes JSON (results/kv_compression_cpu.json by default).

A cache is named as `kv_compression` takes it, optionally with `@N` for its full-precision
window (`kv_full_precision_window`; "fp8@0": FP8 pages alone; plain "fp8": the engine's
default). Each row reports the bits per cached value at 1k and 8k tokens of context with every
byte counted: codes or FP8 values, their per-vector norms, and the tail (the sink and window,
at the compute dtype, per sequence).
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
flags.DEFINE_list("parts", ["compressors", "perplexity", "greedy", "greedy_long", "needle"],
                  "What to run.")
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


DTYPE = "float32"


def parse_cache(spec: str) -> dict:
    """"fp8@16" -> kv_compression "fp8", kv_full_precision_window 16."""
    name, _, window = spec.partition("@")
    return {"kv_compression": name,
            **({"kv_full_precision_window": int(window)} if window else {})}


def make_llm(cache: str, max_model_len: int = 8192) -> LLM:
    return LLM(model="smollm2-135m", dtype=DTYPE, **parse_cache(cache), max_num_seqs=8,
               max_num_batched_tokens=512, max_model_len=max_model_len)


def bits_per_value(compression: str, window: int, head_dim: int, context: int) -> float:
    """Stored bits per cached key or value element at `context` tokens, keys and values
    averaged, the full-precision tail (sink + window, compute dtype) included."""
    if compression == "none":
        return float(jnp.dtype(DTYPE).itemsize * 8)
    if compression == "fp8":
        base = 8.0
    else:
        k, v = make_kv_compression(compression, head_dim)
        base = (k.bits_per_element() + v.bits_per_element()) / 2
    tail = min(1 + window, context) * jnp.dtype(DTYPE).itemsize * 8 / context if window else 0
    return base + tail


def long_prompts(llm: LLM, count: int = 8, length: int = 512) -> list[list[int]]:
    ids = long_text(llm.tokenizer, count * 1024)
    return [ids[i * 1024:i * 1024 + length] for i in range(count)]


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
    reference_tokens: dict[str, list[list[int]]] = {}
    for cache in FLAGS.caches:
        start = time.perf_counter()
        llm = make_llm(cache)
        window = llm.stats().config.kv_full_precision_window
        compression = parse_cache(cache)["kv_compression"]
        row = {"pages": llm.engine.pool.num_pages, "full_precision_window": window,
               "bits_per_value": {str(c): bits_per_value(compression, window,
                                                         llm.config.head_dim, c)
                                  for c in (1024, 8192)}}
        if "perplexity" in smollm_parts:
            row["perplexity"] = perplexity(llm, long_text(llm.tokenizer, FLAGS.perplexity_tokens))
        for part, prompts in (("greedy", GREEDY_PROMPTS), ("greedy_long", long_prompts(llm))):
            if part not in smollm_parts:
                continue
            outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0))
            got = [o.token_ids for o in outs]
            reference = reference_tokens.setdefault(part, got)  # the first cache's
            same = [sum(a == b for a, b in zip(g, r, strict=False)) / max(len(r), 1)
                    for g, r in zip(got, reference, strict=True)]
            first = [next((i for i, (a, b) in enumerate(zip(g, r, strict=False)) if a != b),
                          min(len(g), len(r))) for g, r in zip(got, reference, strict=True)]
            suffix = "" if part == "greedy" else "_long"
            row[f"greedy{suffix}_agreement"] = float(np.mean(same))
            row[f"greedy{suffix}_first_divergence_mean"] = float(np.mean(first))
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
