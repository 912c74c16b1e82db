"""Compressed KV cache on a GPU: the attention kernels and the Llama-3.1-8B decode step, each
against bfloat16 pages in the same run.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 python benchmarks/kv_compression_gpu.py \\
        --output=benchmarks/results/kv_compression_h100.json

Sections (`--sections`):
`fp8` pages are read by the plain kernels (as the engine does); the code kernels read the rest.
`<cache>@N` in the decode section (`fp8@32`, `turboquant-mse-4@32`) adds the full-precision
tail of an N-token window (`kv_full_precision_window`), which the sequence counts include.

- `attention`: the decode kernel reading codes (`kernels_pallas.kv_compress.gpu`, best of a
  small sweep) vs the bfloat16 paged-attention kernel at each (batch, context) of
  `--attention_shapes`, Llama-3.1-8B heads (32 query, 8 KV, head_dim 128), page 16, pages
  scattered through the pool. Reports microseconds and the ratio.
- `decode`: the engine's compiled decode step (random bf16 weights, random cache contents at
  the given context: no prefill is run) for each compression at each `--decode_shapes`
  (batch x context), timed over back-to-back steps; tokens/s and the ratio to "none" at the
  same batch. Then, at `--max_context`, the largest batch whose cache fits beside the weights
  for each compression by bytes, run at that batch; if the step runs out of memory, 20% fewer
  (`--largest_attempts`), so the batch reported is one that ran.
"""

from __future__ import annotations

import dataclasses
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax import lax
from report import header, write
from timing import median_seconds

from dendrite_jax.cache.compressed_kv import CompressedKVCache
from dendrite_jax.cache.kv import PLAIN_KV, KVCache
from dendrite_jax.engine.runner import ModelRunner
from dendrite_jax.engine.step_plan import StepPlan, StepShape
from dendrite_jax.model.calibration import calibration_ids
from dendrite_jax.model.loader import load_model
from dendrite_jax.model.params import with_layer_loop
from kernels_pallas.kv_compress import gpu as code_kernels
from kernels_pallas.kv_compress.rotated import rotated_queries
from kernels_pallas.paged_attention import gpu as plain_kernels
from kernels_pallas.paged_attention.fp8 import FP8_DTYPE, Fp8Calibration
from kernels_pallas.paged_attention.tail import FullPrecisionTail

FLAGS = flags.FLAGS
flags.DEFINE_list("sections", ["attention", "decode"], "Sections to run.")
flags.DEFINE_list("compressions", ["none", "turboquant-4", "turboquant-mse-4"],
                  "Caches compared ('none' is the bfloat16 baseline).")
flags.DEFINE_list("decode_compressions", ["none", "fp8", "fp8@32", "turboquant-4"],
                  "Caches compared in the decode section (each shape compiles the 8B step).")
flags.DEFINE_list("attention_shapes", ["32x4096", "32x8192", "8x32768"], "batch x context.")
flags.DEFINE_list("decode_shapes", ["32x4096", "16x16384", "8x32768"], "batch x context.")
flags.DEFINE_integer("max_context", 32768, "Context of the largest-batch runs (0: skip).")
flags.DEFINE_string("model", "llama-3.1-8b", "Model preset (random weights).")
flags.DEFINE_integer("largest_attempts", 3, "Batches tried per compression in the "
                     "largest-batch runs (each 20% below the last that ran out of memory).")
flags.DEFINE_integer("steps", 20, "Timed decode steps per shape.")
flags.DEFINE_integer("reserve_gib", 6, "GPU memory left beside weights and cache for the "
                     "step's activations when sizing the largest batch.")
flags.DEFINE_string("output", "benchmarks/results/kv_compression_gpu.json", "JSON output.")

PAGE_SIZE = 16
INTERPRET = jax.default_backend() != "gpu"  # off a GPU the script runs, slowly, as a check
SWEEP = [(2, 4), (4, 4), (8, 4), (4, 8)]  # (pages_per_block, num_warps) of the code kernel


def shapes(entries: list[str]) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in e.split("x")) for e in entries]


def seconds_per_call(fn, *args, n: int = 10, repeats: int = 5) -> float:
    """Median seconds of fn(*args) chained n times inside one jit (launch gaps excluded)."""
    @jax.jit
    def chained(x, *rest):
        return lax.fori_loop(0, n, lambda _, y: lax.optimization_barrier(fn(y, *rest)), x)

    return median_seconds(lambda: chained(*args), repeats) / n


class _Heads:  # the part of a ModelConfig a cache's shape reads: Llama-3.1-8B attention
    num_layers, num_kv_heads, head_dim, num_heads = 1, 8, 128, 32


def split_name(compression: str) -> tuple[str, int]:
    """"fp8@32" -> ("fp8", 32): the cache and its full-precision window."""
    name, _, window = compression.partition("@")
    return name, int(window or 0)


def random_cache(cfg, num_pages: int, compression: str, seed: int = 0, slots: int = 1):
    """A cache of given contents, made without a zero copy first so the largest caches fit.
    Codes are random bits (any pattern is a valid code; random codes scatter the kernel's grid
    lookups as real data does), drawn for one layer and repeated over the layers: drawing a
    whole code array at once needs several times its size in temporaries, which is what ran
    out of memory in the first largest-batch runs (not the step)."""
    key = jax.random.key(seed)
    compression, window = split_name(compression)
    tail = None
    if window:  # zeros: the step's time does not depend on the tail's values
        tail = FullPrecisionTail.create(cfg.num_layers, slots, window, cfg.num_kv_heads,
                                        cfg.head_dim, jnp.bfloat16)
    if compression in PLAIN_KV:  # constant: the time does not depend on values
        shape = (cfg.num_layers, num_pages, PAGE_SIZE, cfg.num_kv_heads, cfg.head_dim)
        if compression == "none":
            return KVCache(k=jnp.full(shape, 0.01, jnp.bfloat16),
                           v=jnp.full(shape, 0.02, jnp.bfloat16))
        heads = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
        calibration = Fp8Calibration(k_mean=jnp.zeros(heads), v_mean=jnp.zeros(heads),
                                     k_scale=jnp.ones(heads), v_scale=jnp.ones(heads))
        return KVCache(k=jnp.full(shape, 0.5, FP8_DTYPE), v=jnp.full(shape, 0.25, FP8_DTYPE),
                       fp8=calibration, tail=tail)
    spec = jax.eval_shape(lambda: CompressedKVCache.create(cfg, num_pages, PAGE_SIZE,
                                                           compression))
    leaves, treedef = jax.tree.flatten(spec)
    keys = jax.random.split(key, len(leaves))
    arrays = []
    for k, s in zip(keys, leaves, strict=True):
        layer_shape = s.shape[1:]  # [L, ...]: one layer's worth
        if s.dtype == jnp.uint32:
            one = jax.random.bits(k, layer_shape, jnp.uint32)
        else:  # norms and means
            one = jax.random.uniform(k, layer_shape, s.dtype, 0.5, 1.5)
        arrays.append(jnp.broadcast_to(one[None], s.shape))
    return dataclasses.replace(jax.tree.unflatten(treedef, arrays), tail=tail)


def attention_row(batch: int, context: int, compressions: list[str]) -> dict:
    cfg = _Heads()
    pages_per_seq = context // PAGE_SIZE
    num_pages = batch * pages_per_seq
    tables = jnp.asarray(np.random.default_rng(0).permutation(num_pages)
                         .reshape(batch, pages_per_seq), jnp.int32)
    lens = jnp.full((batch,), context, jnp.int32)
    q = jax.random.normal(jax.random.key(1), (batch, 32, 128), jnp.bfloat16)
    scale = 128 ** -0.5
    row = {"batch": batch, "context": context}
    for compression in compressions:
        kv = random_cache(cfg, num_pages, compression)
        cache_bytes = sum(x.nbytes for x in jax.tree.leaves(kv))
        if compression in PLAIN_KV:  # bfloat16 or FP8 pages: the plain kernel
            def plain(x, kv, tables, lens):
                return plain_kernels.decode(x, kv.k, kv.v, 0, lens, tables, sm_scale=scale,
                                           interpret=INTERPRET)
            us = seconds_per_call(plain, q, kv, tables, lens) * 1e6
            row[compression] = {"us": us, "cache_bytes": cache_bytes}
        else:
            rotated = rotated_queries(q, kv, 0)
            sweep = []
            for pages_per_block, warps in SWEEP:
                tuning = code_kernels.CodeTuning(pages_per_block=pages_per_block,
                                                 num_warps=warps)

                def coded(x, qs, bias, kv, tables, lens, tuning=tuning):
                    return code_kernels.decode(x, qs, bias, kv, 0, lens, tables,
                                               sm_scale=scale, tuning=tuning,
                                               interpret=INTERPRET).astype(x.dtype)
                try:
                    us = seconds_per_call(coded, *rotated, kv, tables, lens) * 1e6
                    sweep.append({"pages_per_block": pages_per_block, "num_warps": warps,
                                  "us": us})
                except Exception as e:  # a tuning that does not compile is recorded
                    sweep.append({"pages_per_block": pages_per_block, "num_warps": warps,
                                  "error": f"{type(e).__name__}: {e}"[:300]})
            timed = [s for s in sweep if "us" in s]
            best = min(timed, key=lambda s: s["us"]) if timed else {}
            row[compression] = {**best, "cache_bytes": cache_bytes, "sweep": sweep}
        del kv
        gc.collect()
    base = row.get("none", {}).get("us")
    for compression in compressions:
        us = row[compression].get("us")
        if base and us:
            row[compression]["speed_vs_bf16"] = base / us
    logging.info("attention %s", row)
    return row


def decode_plan(batch: int, context: int) -> StepPlan:
    pages_per_seq = context // PAGE_SIZE + 1
    plan = StepPlan.empty(StepShape(num_tokens=batch, num_seqs=batch,
                                    pages_per_seq=pages_per_seq, decode_only=True))
    plan.input_ids[:] = np.random.default_rng(batch).integers(3, 30000, batch)
    plan.q_lens[:] = 1
    plan.seq_lens[:] = context
    plan.page_tables[:] = np.arange(batch * pages_per_seq).reshape(batch, pages_per_seq)
    plan.slot_ids[:] = np.arange(batch)
    plan.prompt_lens[:] = context - 1
    plan.sample[:] = 1
    return plan


def decode_row(model, batch: int, context: int, compression: str,
               memory: dict | None = None) -> dict:
    """Time the decode step; `memory` receives the compiled step's memory analysis and the
    device's bytes in use before it runs (kept when the run then fails)."""
    cfg = model.config
    memory = {} if memory is None else memory
    plan = decode_plan(batch, context)
    num_pages = batch * plan.shape.pages_per_seq
    runner = ModelRunner(cfg, model.params, num_pages=2, page_size=PAGE_SIZE,
                         num_slots=batch, dtype="bfloat16", attention_backend=(
                             "pallas_gpu"), kv_compression=split_name(compression)[0],
                         full_precision_window=split_name(compression)[1],
                         calibration=calibration_ids(None, cfg.vocab_size))
    try:
        runner.kv = random_cache(cfg, num_pages, compression, slots=batch)
        cache_bytes = sum(x.nbytes for x in jax.tree.leaves(runner.kv))
        start = time.perf_counter()
        analysis = runner.compile(plan.shape).memory_analysis()
        compile_s = time.perf_counter() - start
        if analysis is not None:  # not every backend reports one
            memory.update({f"{name}_gib": getattr(analysis, f"{name}_size_in_bytes") / 2**30
                           for name in ("argument", "output", "alias", "temp")})
        memory["in_use_before_gib"] = (jax.devices()[0].memory_stats() or {}).get(
            "bytes_in_use", 0) / 2**30
        jax.block_until_ready(runner.launch(plan))
        jax.block_until_ready(runner.launch(plan))
        start = time.perf_counter()
        for _ in range(FLAGS.steps):
            out = runner.launch(plan)
        jax.block_until_ready(out)
        step = (time.perf_counter() - start) / FLAGS.steps
    finally:
        runner.kv = None  # freed even while a failure's traceback holds the runner
    row = {"compression": compression, "batch": batch, "context": context,
           "ms_per_step": step * 1e3, "tokens_per_s": batch / step,
           "cache_gib": cache_bytes / 2**30, "compile_s": compile_s, "memory": memory}
    logging.info("decode %s", row)
    del runner
    gc.collect()
    return row


def seq_bytes(cfg, context: int, compression: str) -> int:
    pages = context // PAGE_SIZE + 1
    name, window = split_name(compression)
    tail = FullPrecisionTail.bytes_per_slot(cfg.num_layers, window, cfg.num_kv_heads,
                                            cfg.head_dim, jnp.bfloat16) if window else 0
    if name in PLAIN_KV:
        dtype = "bfloat16" if name == "none" else FP8_DTYPE
        return pages * KVCache.bytes_per_page(cfg, PAGE_SIZE, dtype) + tail
    return pages * CompressedKVCache.bytes_per_page(cfg, PAGE_SIZE, name) + tail


def decode_section(report: dict) -> None:
    model = load_model(FLAGS.model, "bfloat16")
    model = dataclasses.replace(model, params=with_layer_loop(model.params, "unrolled",
                                                              consume=True))  # as LLM runs
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.params))
    report["weight_gib"] = weight_bytes / 2**30
    rows = report.setdefault("decode", [])
    for batch, context in shapes(FLAGS.decode_shapes):
        group = [decode_row(model, batch, context, c) for c in FLAGS.decode_compressions]
        base = next((r for r in group if r["compression"] == "none"), None)
        for r in group:
            if base and r is not base:
                r["speed_vs_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]
        rows.extend(group)
        write(report, FLAGS.output)
    if not FLAGS.max_context:
        return
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit", 0)
    if not limit:
        logging.warning("no device memory limit reported: largest-batch runs skipped")
        return
    free = limit - weight_bytes - FLAGS.reserve_gib * 2**30
    largest = report.setdefault("largest_batch", [])
    for c in FLAGS.decode_compressions:
        batch = int(free // seq_bytes(model.config, FLAGS.max_context, c))
        entry = {"compression": c, "context": FLAGS.max_context, "batch_by_bytes": batch,
                 "bytes_limit_gib": limit / 2**30, "failed": []}
        for _ in range(FLAGS.largest_attempts):  # out of memory: retry 20% smaller
            memory: dict = {}
            try:
                entry.update(decode_row(model, batch, FLAGS.max_context, c, memory))
                break
            except Exception as e:
                entry["failed"].append({"batch": batch, "memory": memory,
                                        "error": f"{type(e).__name__}: {e}"[:300]})
            gc.collect()
            batch = int(batch * 0.8)
        entry.setdefault("batch", None)
        largest.append(entry)
        write(report, FLAGS.output)
    base = next((e for e in largest if e["compression"] == "none" and e.get("batch")), None)
    for e in largest:
        if base and e.get("batch"):
            e["batch_vs_bf16"] = e["batch"] / base["batch"]
            if "tokens_per_s" in e and "tokens_per_s" in base:
                e["throughput_vs_bf16"] = e["tokens_per_s"] / base["tokens_per_s"]


def print_tables(report: dict) -> None:
    for row in report.get("attention", []):
        cells = [f"{c} {row[c].get('us', float('nan')):.0f} us "
                 f"({row[c].get('speed_vs_bf16', 1):.2f}x)" for c in FLAGS.compressions]
        print(f"attention b{row['batch']} ctx{row['context']}: " + ", ".join(cells))
    for r in report.get("decode", []):
        print(f"decode {r['compression']:>16} b{r['batch']:<3} ctx{r['context']:<6} "
              f"{r['ms_per_step']:7.2f} ms/step {r['tokens_per_s']:8.0f} tok/s "
              f"{r.get('speed_vs_bf16', 1):.2f}x")
    for e in report.get("largest_batch", []):
        print(f"largest {e['compression']:>16} ctx{e['context']} batch {e['batch']} "
              f"({e.get('batch_vs_bf16', 1):.2f}x) "
              f"{e.get('tokens_per_s', float('nan')):.0f} tok/s (by bytes {e['batch_by_bytes']}, "
              f"{len(e['failed'])} out of memory)")


def main(argv: list[str]) -> None:
    del argv
    report = header("kv_compression_gpu", page_size=PAGE_SIZE, model=FLAGS.model)
    if "attention" in FLAGS.sections:
        report["attention"] = []
        for batch, context in shapes(FLAGS.attention_shapes):
            report["attention"].append(attention_row(batch, context, FLAGS.compressions))
            write(report, FLAGS.output)
    if "decode" in FLAGS.sections:
        decode_section(report)
    write(report, FLAGS.output)
    print_tables(report)


if __name__ == "__main__":
    app.run(main)
