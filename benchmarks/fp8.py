"""FP8 weights: quality on SmolLM2 (CPU) and speed on a GPU, each against the unquantized model
in the same run.

    python benchmarks/fp8.py --parts=quality                      # CPU, ~8 min
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python benchmarks/fp8.py --parts=matmul,decode \\
        --output=benchmarks/results/fp8_h100.json                  # GPU

Parts:
- quality: SmolLM2 float32 vs its projections in MXFP8 and per-channel FP8 (all layers as LLM
  quantizes them, the same with the other norm-folding choice, and with `--keep_layers`
  unquantized): perplexity on a long English text (`quality.long_text`)
  and greedy agreement over 8 prompts x 32 tokens.
- sensitivity: SmolLM2 perplexity with MXFP8 everywhere but one layer, for each layer (which
  layers `fp8_keep_layers` should keep).
- matmul: TFLOP/s of x [M, K] @ w [K, N] at 4096^3 and at decode shapes (M = 1..64 against the
  Llama-3.1-8B projections): bfloat16 (XLA), XLA's FP8 dot (E4M3 operands), and our FP8 weights
  through each `kernels_pallas.fp8_matmul` backend (reference: dequantize then multiply;
  kernel: the platform's Pallas kernel).
- sweep: per scheme, the GPU kernel's tensor-core path (block_n x k_splits) at M = 32 and the
  one-row CUDA-core kernel (`Fp8Tuning.gemv`: columns, K values per step, warps) at
  M = 1, at the 8B projections, as weight GB/s (the bandwidth it streams the FP8 weight at)
  against bf16 XLA's in the same run. Timed by GPU kernel time with the weights cold: distinct
  copies of each weight (at least 200 MB, 4x the L2) are each multiplied once per call, as in a
  decode step (a weight re-read in a loop sits partly in L2 and ranks tunings wrongly at the
  margin, NOTES.md). `best_gemv` is each scheme's one-row tuning with the best geometric mean.
- decode: Llama-3.1-8B-shaped decode (random weights) at batch 1 and 32, bfloat16 vs each
  scheme's `weights_dtype` on the tensor-core path and (batch 1) the one-row kernel, with its
  default tuning and, when the sweep ran first, the sweep's best; timed as the difference
  between generating 16 and 112 tokens.
"""

from __future__ import annotations

import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax import lax
from quality import GREEDY_PROMPTS, long_text, perplexity
from report import header, write
from timing import median_seconds
from trace_events import device_seconds

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.quant import fp8
from kernels_pallas.codecs import fp8 as fp8_format
from kernels_pallas.fp8_matmul import fp8_matmul, gpu

FLAGS = flags.FLAGS
flags.DEFINE_list("parts", ["quality"], "quality, sensitivity (CPU); matmul, sweep, decode "
                  "(GPU).")
flags.DEFINE_list("schemes", ["mxfp8", "fp8-channel"], "FP8 schemes compared.")
flags.DEFINE_list("keep_layers", ["0", "1", "-1"], "Quality part: also each scheme with these "
                  "layers unquantized (fp8_keep_layers); empty: skip.")
flags.DEFINE_integer("perplexity_tokens", 1024, "Tokens of text scored.")
flags.DEFINE_list("decode_batches", ["1", "32"], "Batch sizes of the decode part.")
flags.DEFINE_list("sweep_rows", ["1", "32"], "Rows of x in the sweep part (1: the one-row "
                  "kernel's tunings; more: the tensor-core path's).")
flags.DEFINE_bool("decode_gemv", True, "Decode part, batch 1: the one-row CUDA-core kernel "
                  "(Fp8Tuning.gemv); off: the tensor-core path.")
flags.DEFINE_string("output", "benchmarks/results/fp8_cpu.json", "JSON output.")

SHORT, LONG = 16, 112
DECODE_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]  # 8B: qkv, o, gate/up, down


def quality() -> dict:
    rows, reference = {}, None
    keep = [int(i) for i in FLAGS.keep_layers]
    # Each scheme as LLM sets it up (norms folded or not: fp8.FOLD_NORMS), with the other
    # choice, and with --keep_layers kept.
    variants = [(None, [], None), *((s, [], None) for s in FLAGS.schemes),
                *((s, [], not fp8.FOLD_NORMS[s]) for s in FLAGS.schemes),
                *((s, keep, None) for s in FLAGS.schemes if keep)]
    for scheme, kept, fold in variants:
        llm = LLM(model="smollm2-135m", dtype="float32", weights_dtype=scheme,
                  fp8_keep_layers=kept, fp8_fold_norms=fold, max_num_batched_tokens=512,
                  max_model_len=2048)
        name = ((scheme or "float32") + (f" keep {','.join(map(str, kept))}" if kept else "")
                + ("" if fold is None else " norms folded" if fold else " norms apart"))
        row = {"perplexity": perplexity(llm, long_text(llm.tokenizer, FLAGS.perplexity_tokens))}
        got = [o.token_ids for o in llm.generate(GREEDY_PROMPTS,
                                                  SamplingParams(max_tokens=32, temperature=0))]
        reference = reference or got
        row["greedy_agreement"] = float(np.mean([
            sum(a == b for a, b in zip(g, r, strict=False)) / max(len(r), 1)
            for g, r in zip(got, reference, strict=True)]))
        row["greedy_first_divergence_mean"] = float(np.mean([
            next((i for i, (a, b) in enumerate(zip(g, r, strict=False)) if a != b),
                 min(len(g), len(r))) for g, r in zip(got, reference, strict=True)]))
        rows[name] = row
        print(name, row, flush=True)
        del llm
        gc.collect()
    base = rows["float32"]["perplexity"]
    for row in rows.values():
        row["perplexity_vs_float32"] = row["perplexity"] / base
    return rows


def sensitivity() -> list[dict]:
    def ppl(keep: int | None) -> tuple[float, int]:
        llm = LLM(model="smollm2-135m", dtype="float32", max_num_batched_tokens=512,
                  max_model_len=2048, weights_dtype=None if keep is None else "mxfp8",
                  fp8_keep_layers=[] if keep is None else [keep])
        value = perplexity(llm, long_text(llm.tokenizer, FLAGS.perplexity_tokens))
        layers = llm.config.num_layers
        del llm
        gc.collect()
        return value, layers

    base, layers = ppl(None)
    rows = []
    for keep in range(layers):
        value, _ = ppl(keep)
        rows.append({"kept_layer": keep, "perplexity": value,
                     "perplexity_vs_float32": value / base})
        print(rows[-1], flush=True)
    return rows


def seconds_per_call(fn, *args, n: int = 20, repeats: int = 5) -> float:
    """Median seconds per call of fn(*args) chained n times in one jit (its output feeds a
    zero-weight term of the next call's input, so calls cannot be merged or hoisted)."""
    @jax.jit
    def chained(x, *rest):
        def body(_, y):
            out = fn(y, *rest)
            return y + (0 * out.reshape(-1)[0]).astype(y.dtype)
        return lax.fori_loop(0, n, body, x)

    return median_seconds(lambda: chained(*args), repeats) / n


def matmul_rows() -> list[dict]:
    rows = []
    shapes = [(4096, 4096, 4096)] + [(m, k, n) for m in (1, 16, 32, 64)
                                      for k, n in DECODE_SHAPES]
    for m, k, n in shapes:
        key = jax.random.key(m + k + n)
        x = jax.random.normal(key, (m, k), jnp.bfloat16)
        w = jax.random.normal(jax.random.fold_in(key, 1), (k, n), jnp.bfloat16)
        flops = 2 * m * k * n
        row = {"m": m, "k": k, "n": n}
        seconds = seconds_per_call(lambda x, w: x @ w, x, w)
        row["bf16"] = flops / seconds / 1e12
        row["bf16_weight_gb_s"] = w.nbytes / seconds / 1e9
        x8, w8 = x.astype(jnp.float8_e4m3fn), w.astype(jnp.float8_e4m3fn)

        def xla_fp8(x8, w8):
            return lax.dot_general(x8, w8, (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.bfloat16)
        row["xla_fp8"] = flops / seconds_per_call(xla_fp8, x8, w8) / 1e12
        for scheme in FLAGS.schemes:
            q = fp8_format.quantize(w, scheme)
            for backend in ("reference", "auto"):
                def ours(x, q, backend=backend):
                    return fp8_matmul(x, q, backend)
                label = f"{scheme}_{'kernel' if backend == 'auto' else backend}"
                seconds = seconds_per_call(ours, x, q)
                row[label] = flops / seconds / 1e12
                row[f"{label}_weight_gb_s"] = weight_bytes(q) / seconds / 1e9
        rows.append(row)
        logging.info("matmul %s", row)
    return rows


def weight_bytes(q: fp8_format.Fp8Weight) -> int:
    return q.values.nbytes + q.scales.nbytes


GEMV_TUNINGS = {  # the one-row kernel's sweep: columns, K values per step, warps
    f"gemv_n{n}_k{k}_w{w}": gpu.Fp8Tuning(gemv_block_n=n, gemv_block_k=k, gemv_warps=w)
    for n, k in ((16, 256), (16, 512), (32, 128), (32, 256), (64, 128)) for w in (4, 8)}
TENSOR_CORE_TUNINGS = {f"n{block_n}_s{splits or 'auto'}":
                       gpu.Fp8Tuning(block_n=block_n, k_splits=splits, gemv=False)
                       for block_n in (64, 128) for splits in (1, 2, 4, 8, 16, None)}
COLD_BYTES = 200 * 2**20  # 4x the H100's L2: weights read once per call come from HBM


def cold_seconds(fn, x: jax.Array, weights: list) -> float:
    """GPU kernel seconds of one fn(x, w), each of `weights` (distinct copies holding at
    least COLD_BYTES) multiplied once in one jit, so every call reads its weight from HBM as
    a decode step does; timed by kernel time from a profiler trace, without launch gaps."""
    @jax.jit
    def every(x, weights):
        return [fn(x, w) for w in weights]

    def run() -> None:
        jax.block_until_ready(every(x, weights))

    run()
    return device_seconds(run) / len(weights)


def cold_copies(w, nbytes: int) -> list:
    """Enough distinct device copies of w (an array or an Fp8Weight) to hold COLD_BYTES."""
    return [jax.tree.map(jnp.copy, w) for _ in range(max(2, -(-COLD_BYTES // nbytes)))]


def best_gemv(rows: list[dict]) -> dict[str, str]:
    """Per scheme, the one-row tuning with the best geometric-mean GB/s over the M = 1 shapes."""
    best = {}
    for scheme in {r["scheme"] for r in rows}:
        ones = [r for r in rows if r["m"] == 1 and r["scheme"] == scheme]
        scores = {label: np.exp(np.mean([np.log(r[label]) for r in ones]))
                  for label in GEMV_TUNINGS if all(isinstance(r.get(label), float) for r in ones)}
        if scores:
            best[scheme] = max(scores, key=scores.get)
    return best


def sweep_rows() -> list[dict]:
    rows = []
    for scheme in FLAGS.schemes:
        for m in [int(r) for r in FLAGS.sweep_rows]:
            for k, n in DECODE_SHAPES:
                key = jax.random.key(m + k + n)
                x = jax.random.normal(key, (m, k), jnp.bfloat16)
                w = jax.random.normal(jax.random.fold_in(key, 1), (k, n), jnp.bfloat16)
                q = fp8_format.quantize(w, scheme)
                bf16 = cold_seconds(lambda x, w: x @ w, x, cold_copies(w, w.nbytes))
                row = {"scheme": scheme, "m": m, "k": k, "n": n,
                       "bf16_weight_gb_s": w.nbytes / bf16 / 1e9}
                copies = cold_copies(q, weight_bytes(q))
                tunings = GEMV_TUNINGS if m == 1 else TENSOR_CORE_TUNINGS
                for label, tuning in tunings.items():
                    try:
                        seconds = cold_seconds(
                            lambda x, q, t=tuning: gpu.fp8_matmul(x, q, tuning=t), x, copies)
                    except Exception as error:  # noqa: BLE001 - a failed tuning is a result
                        row[label] = f"{type(error).__name__}: {str(error)[:200]}"
                        continue
                    row[label] = weight_bytes(q) / seconds / 1e9
                rows.append(row)
                logging.info("sweep %s", row)
                del copies
                gc.collect()
    return rows


def decode_rows(report: dict) -> list[dict]:
    rows = report["decode"] = []
    rng = np.random.default_rng(0)
    for batch in [int(b) for b in FLAGS.decode_batches]:
        ids = rng.integers(3, 30000, (batch, 128)).tolist()
        # (weights, kernel tuning label): several rows take the tensor-core path; one row
        # the one-row kernel with its scheme's default tuning and the sweep's best where that
        # differs (when the sweep ran in this process), or with --nodecode_gemv the
        # tensor-core path instead
        best = report.get("best_gemv") or {}
        tunings = {"tensor-core": gpu.Fp8Tuning(gemv=False), "one-row": None,  # per scheme
                   **GEMV_TUNINGS}
        one_row = batch == 1 and FLAGS.decode_gemv
        variants = [(None, "tensor-core")]
        for scheme in FLAGS.schemes:
            if not one_row:
                variants.append((scheme, "tensor-core"))
                continue
            variants.append((scheme, "one-row"))
            if scheme in best and GEMV_TUNINGS[best[scheme]] != gpu.SCHEME_TUNINGS[scheme]:
                variants.append((scheme, best[scheme]))  # only where it is not the default
        for weights, label in variants:
            gpu.DEFAULT_TUNING = tunings[label]
            jax.clear_caches()  # traces of the step made under the other tuning
            llm = LLM(model="llama-3.1-8b", dtype="bfloat16", weights_dtype=weights,
                      max_num_seqs=batch, max_num_batched_tokens=2048, max_model_len=512,
                      kv_cache_bytes=2 * 2**30, warmup=False)
            params = [SamplingParams(max_tokens=t, temperature=0, ignore_eos=True)
                      for t in (SHORT, LONG)]
            llm.generate(ids, params[1])  # compiles
            runs = {}
            for p in params * 2:
                start = time.perf_counter()
                llm.generate(ids, p)
                runs.setdefault(p.max_tokens, []).append(time.perf_counter() - start)
            step = (min(runs[LONG]) - min(runs[SHORT])) / (LONG - SHORT)
            rows.append({"batch": batch, "weights": (weights or "bfloat16") + (
                             f" {label}" if weights else ""),
                         "ms_per_step": step * 1e3, "tokens_per_s": batch / step,
                         "weight_gib": sum(x.nbytes for x in jax.tree.leaves(
                             llm.model.params)) / 2**30})
            logging.info("decode %s", rows[-1])
            write(report, FLAGS.output)
            del llm
            gc.collect()
        base = rows[-len(variants)]["tokens_per_s"]
        for row in rows[1 - len(variants):]:
            row["speed_vs_bf16"] = row["tokens_per_s"] / base
    gpu.DEFAULT_TUNING = None
    return rows


def main(argv: list[str]) -> None:
    del argv
    report = header("fp8")
    if "quality" in FLAGS.parts:
        report["quality"] = quality()
        write(report, FLAGS.output)
    if "sensitivity" in FLAGS.parts:
        report["sensitivity"] = sensitivity()
        write(report, FLAGS.output)
    if "matmul" in FLAGS.parts:
        report["matmul"] = matmul_rows()
        write(report, FLAGS.output)
    if "sweep" in FLAGS.parts:
        report["sweep"] = sweep_rows()
        report["best_gemv"] = best_gemv(report["sweep"])
        write(report, FLAGS.output)
    if "decode" in FLAGS.parts:
        decode_rows(report)
    write(report, FLAGS.output)
    for name, row in report.get("quality", {}).items():
        print(f"{name:22s} perplexity {row['perplexity']:.3f} "
              f"({row['perplexity_vs_float32']:.4f}x) greedy {row['greedy_agreement']:.0%}")
    for row in report.get("matmul", []):
        print(f"matmul {row['m']}x{row['k']}x{row['n']}: " + ", ".join(
            f"{k} {v:.1f}" for k, v in row.items() if k not in ("m", "k", "n")) + " TFLOP/s")
    for row in report.get("sweep", []):
        print(f"sweep {row['scheme']} {row['m']}x{row['k']}x{row['n']} weight GB/s: " + ", ".join(
            f"{k} {v:.0f}" if isinstance(v, float) else f"{k} failed"
            for k, v in row.items() if k not in ("scheme", "m", "k", "n")))
    for row in report.get("decode", []):
        print(f"decode b{row['batch']} {row['weights']}: {row['ms_per_step']:.2f} ms/step "
              f"{row['tokens_per_s']:.0f} tok/s {row.get('speed_vs_bf16', 1):.2f}x")


if __name__ == "__main__":
    app.run(main)
