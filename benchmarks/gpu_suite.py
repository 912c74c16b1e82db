"""GPU suite: the card's ceilings, the paged-attention kernel, and end-to-end decode against the
hardware floor and against transformers, in one run on one card.

    XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python benchmarks/gpu_suite.py \\
        --output=benchmarks/results/gpu_suite_h100.json

Sections (`--sections`, in this order; each one's results are written as soon as it ends, and
results already in `--output` from sections not run are kept):

- `ceilings`: device copy bandwidth (bytes read + bytes written) and bf16 matmul TFLOP/s.
- `attention`: the decode kernel at each (batch, context) of `--attention_shapes` with Llama-3.1-8B
  heads (32 query, 8 KV, head_dim 128, bf16, page 16, pages scattered through the pool), the
  best of a small tuning sweep, as KV bytes read per second and as a fraction of the copy
  bandwidth; JAX's deprecated Pallas-Triton `paged_attention` and our pure-JAX reference on the
  same shapes.
- `decode`: the engine's decode step (random bf16 weights) for each `--decode_models` entry,
  timed as the difference between generating 16 and 112 tokens after a 128-token prompt, so
  prefill and compilation cancel; compared with the (weights + KV read) / copy-bandwidth floor.
  The engine runs with `--max_num_batched_tokens` (8192, an offline-throughput setting: a
  batch's prompts prefill in one or few steps, as transformers prefills them in one).
- `transformers`: Hugging Face `generate`, static cache, compiled (warmed twice), on the same
  prompts; compared by whole-`generate` tokens/s (prefill included, as for ours), and by decode
  step: the same compiled `generate` stopped after 16 tokens, subtracted from the 112-token run
  (as ours is timed). Each is the best of two timed runs, as ours is.

Timing: ceilings and kernels are each chained 10 times inside one jit and timed two ways, by
wall clock and by GPU kernel time from a profiler trace. Kernel time is the primary figure, and
each kernel is compared with the copy kernel measured the same way: a chain of short kernels
driven from the host leaves launch gaps (~35-50 µs a call measured on H100s) that the engine's
steps, one CUDA graph each, do not have; at (32, 1k) they are a third of the wall time. Wall
figures are kept in the JSON (`wall_*`).

XLA_PYTHON_CLIENT_MEM_FRACTION leaves PyTorch room on the card for the transformers section.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax import lax
from report import header, write
from timing import median_seconds
from trace_events import device_seconds

from dendrite_jax import LLM, SamplingParams
from dendrite_jax.config import load_preset
from kernels_pallas.paged_attention import gpu, ragged_rows, reference_ragged_paged_attention

FLAGS = flags.FLAGS
flags.DEFINE_list("sections", ["ceilings", "attention", "decode", "transformers"],
                  "Sections to run.")
flags.DEFINE_list("attention_shapes", ["32x1024", "32x2048", "32x4096", "32x8192", "64x4096",
                                       "128x1024", "128x4096", "128x8192"],
                  "Decode attention shapes, batch x context.")
flags.DEFINE_list("decode_models", ["llama-3.2-1b:1/16/64", "llama-3.1-8b:1/32"],
                  "preset:batch/batch/... for the decode and transformers sections.")
flags.DEFINE_list("tunings", ["4:2:1:1", "4:4:1:1", "8:8:1:1", "4:2:1:2"],
                  "Decode-kernel tunings swept per attention shape, each pages_per_block:"
                  "num_warps:num_stages:splits (splits as a multiple of the default, or "
                  "=N for exactly N splits: 4:4:1:=1 reads each sequence in one program).")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens for decode timing.")
flags.DEFINE_integer("max_num_batched_tokens", 8192, "The engine's token budget per step (prefill "
                     "chunk size) in the decode section.")
flags.DEFINE_integer("decode_burst", None, "Decode steps per launch (LLM's decode_burst); "
                     "default: the engine's.")
flags.DEFINE_string("output", "benchmarks/results/gpu_suite.json", "JSON output path.")

PAGE_SIZE = 16
SHORT, LONG = 16, 112  # decode steps are timed as (LONG - SHORT) generated tokens


def seconds_per_call(fn, x, *args, n: int = 10, repeats: int = 5) -> tuple[float, float]:
    """(wall, device) seconds per call of fn(x, *args) -> like x, chained n times inside one
    jit. Wall: the median over `repeats` runs (host overhead amortised, the launch gaps
    between the chained calls included). Device: GPU kernel time per call from a profiler
    trace (`trace_events.device_seconds`: every kernel the call runs, none of the gaps)."""
    @jax.jit
    def chained(x, *args):
        # The barrier keeps XLA from unrolling the loop and fusing the calls into one.
        return lax.fori_loop(0, n, lambda _, y: lax.optimization_barrier(fn(y, *args)), x)

    def run() -> None:
        jax.block_until_ready(chained(x, *args))

    return median_seconds(run, repeats) / n, device_seconds(run) / n


def ceilings() -> dict:
    x = jax.random.normal(jax.random.key(0), (2**30,), jnp.bfloat16)  # 2 GiB
    # 1.5, not a value near 1: bf16 rounds 1 + 2^-10 to 1 and XLA drops the multiply.
    copy_s, copy_device_s = seconds_per_call(lambda y: y * jnp.bfloat16(1.5), x)
    del x
    a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.bfloat16)
    mm_s, mm_device_s = seconds_per_call(
        lambda y, b: (y @ b).astype(jnp.bfloat16) * jnp.bfloat16(0.01), a, b)
    copy_bytes, flops = 2 * 2**31, 2 * 8192**3
    return {"copy_gb_per_s": copy_bytes / copy_s / 1e9,
            "copy_device_gb_per_s": copy_bytes / copy_device_s / 1e9,
            "bf16_matmul_tflops": flops / mm_s / 1e12,
            "bf16_matmul_device_tflops": flops / mm_device_s / 1e12}


def attention_inputs(batch: int, context: int, num_heads=32, num_kv_heads=8, head_dim=128):
    pages_per_seq = context // PAGE_SIZE
    num_pages = batch * pages_per_seq
    keys = jax.random.split(jax.random.key(batch * context), 3)
    shape = (1, num_pages, PAGE_SIZE, num_kv_heads, head_dim)
    k = jax.random.normal(keys[0], shape, jnp.bfloat16)
    v = jax.random.normal(keys[1], shape, jnp.bfloat16)
    q = jax.random.normal(keys[2], (batch, num_heads, head_dim), jnp.bfloat16)
    tables = np.random.default_rng(0).permutation(num_pages).reshape(batch, pages_per_seq)
    return q, k, v, jnp.asarray(tables, jnp.int32), jnp.full((batch,), context, jnp.int32)


def attention_row(batch: int, context: int, limits: dict | None) -> dict:
    q, k, v, tables, lens = attention_inputs(batch, context)
    head_dim = q.shape[-1]
    kv_bytes = k.nbytes + v.nbytes
    scale = head_dim ** -0.5
    row = {"batch": batch, "context": context, "kv_bytes": kv_bytes}

    def rate(seconds: tuple[float, float]) -> dict:
        """Device time is the primary figure (as against the copy kernel's device time); wall
        time, against the wall-timed copy, is kept alongside."""
        wall, device = seconds
        out = {"us": device * 1e6, "kv_tb_per_s": kv_bytes / device / 1e12,
               "wall_us": wall * 1e6, "wall_kv_tb_per_s": kv_bytes / wall / 1e12}
        if limits:
            out["fraction_of_copy"] = kv_bytes / device / (limits["copy_device_gb_per_s"] * 1e9)
            out["wall_fraction_of_copy"] = kv_bytes / wall / (limits["copy_gb_per_s"] * 1e9)
        return out

    rows = ragged_rows(jnp.ones_like(lens), lens, tables, num_tokens=batch, decode_only=True)
    ref = reference_ragged_paged_attention(q, k, v, 0, rows, sm_scale=scale).astype(jnp.float32)
    sweep = []
    for entry in FLAGS.tunings:
        *fields, split_field = entry.split(":")
        pages_per_block, warps, stages = (int(x) for x in fields)
        blocks = tables.shape[1] // pages_per_block
        splits = (int(split_field[1:]) if split_field.startswith("=") else
                  int(split_field) * gpu.default_num_splits(batch, k.shape[3], blocks))
        tuning = gpu.DecodeTuning(pages_per_block, min(splits, blocks), warps, stages)
        def ours(x, k, v, tables, lens, tuning=tuning):
            return gpu.decode(x, k, v, 0, lens, tables, sm_scale=scale, tuning=tuning)
        try:
            out = ours(q, k, v, tables, lens).astype(jnp.float32)
            error = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            sweep.append({"tuning": vars(tuning).copy(), "rel_error": error,
                          **rate(seconds_per_call(ours, q, k, v, tables, lens))})
        except Exception as e:  # a tuning that does not compile is recorded, not fatal
            sweep.append({"tuning": vars(tuning).copy(), "error": f"{type(e).__name__}: {e}"})
    timed = [s for s in sweep if "us" in s]
    row["ours"] = min(timed, key=lambda s: s["us"]) if timed else None
    row["sweep"] = sweep

    def reference(x, k, v, tables, lens):
        rows = ragged_rows(jnp.ones_like(lens), lens, tables, num_tokens=batch,
                           decode_only=True)
        return reference_ragged_paged_attention(x, k, v, 0, rows, sm_scale=scale)
    row["reference"] = rate(seconds_per_call(reference, q, k, v, tables, lens, n=3, repeats=3))
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

        k_hm, v_hm = (jnp.transpose(a[0], (2, 0, 1, 3)) for a in (k, v))  # [Hkv, N, ps, hd]
        splits = min(16, tables.shape[1])

        def upstream(x, k, v, tables, lens):
            return jax_paged.paged_attention(x * scale, k, v, tables, lens, k_splits=splits)
        out = upstream(q, k_hm, v_hm, tables, lens).astype(jnp.float32)
        row["jax_pallas_triton"] = {
            "rel_error": float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)),
            **rate(seconds_per_call(upstream, q, k_hm, v_hm, tables, lens))}
    except Exception as e:
        row["jax_pallas_triton"] = {"error": f"{type(e).__name__}: {e}"}
    return row


def parse_models() -> list[tuple[str, list[int]]]:
    models = []
    for entry in FLAGS.decode_models:
        preset, batches = entry.split(":")
        models.append((preset, [int(b) for b in batches.split("/")]))
    return models


def prompts(batch: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(batch)
    return rng.integers(3, min(vocab, 30000), (batch, FLAGS.prompt_len)).tolist()


def kv_read_bytes(preset: str, batch: int) -> int:
    """KV bytes a decode step reads at the mean context of the timed steps."""
    cfg = load_preset(preset).model
    context = FLAGS.prompt_len + (SHORT + LONG) // 2
    return batch * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2


def generate_seconds(llm: LLM, ids: list[list[int]], tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(ids, params)
    return time.perf_counter() - start


def engine_decode(preset: str, batches: list[int], limits: dict | None) -> list[dict]:
    rows = []
    for batch in batches:
        burst = {} if FLAGS.decode_burst is None else dict(decode_burst=FLAGS.decode_burst)
        llm = LLM(model=preset, dtype="bfloat16", max_num_seqs=batch,
                  max_num_batched_tokens=FLAGS.max_num_batched_tokens, max_model_len=512,
                  kv_cache_bytes=2 * 2**30, warmup=False, **burst)
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(llm.model.params))
        ids = prompts(batch, llm.config.vocab_size)
        generate_seconds(llm, ids, LONG)  # compiles every shape the timed runs use
        long_runs, short_runs = [], []
        engine = llm.engine
        host0, wait0, steps0 = engine.host_seconds, engine.wait_seconds, engine.num_steps
        launch0 = engine.launch_seconds
        for _ in range(2):
            long_runs.append(generate_seconds(llm, ids, LONG))
            short_runs.append(generate_seconds(llm, ids, SHORT))
        steps = engine.num_steps - steps0
        step = min(a - b for a, b in zip(long_runs, short_runs, strict=True)) / (LONG - SHORT)
        floor_bytes = weight_bytes + kv_read_bytes(preset, batch)
        row = {"model": preset, "batch": batch, "decode_burst": getattr(engine, "burst", 1),
               "max_num_batched_tokens": FLAGS.max_num_batched_tokens,
               "ms_per_step": step * 1e3,
               "tokens_per_s": batch / step,
               "generate_tokens_per_s": batch * LONG / min(long_runs),
               "weight_bytes": weight_bytes,
               "kv_read_bytes": kv_read_bytes(preset, batch),
               "compilations": llm.compilations,
               # Host time per launch (a burst of decode steps is one) outside waits for
               # results (launch included: dispatch can block while the device is busy), and
               # time blocked reading results.
               "host_ms_per_step": 1e3 * (engine.host_seconds - host0) / steps,
               "launch_ms_per_step": 1e3 * (engine.launch_seconds - launch0) / steps,
               "wait_ms_per_step": 1e3 * (engine.wait_seconds - wait0) / steps}
        if limits:
            # The floor at the copy kernel's device-time bandwidth (the card's real rate); the
            # wall-timed copy, lower, gives the second (more lenient) figure.
            floor = floor_bytes / (limits["copy_device_gb_per_s"] * 1e9)
            wall_floor = floor_bytes / (limits["copy_gb_per_s"] * 1e9)
            row.update(floor_ms=floor * 1e3, fraction_of_floor=floor / step,
                       fraction_of_wall_copy_floor=wall_floor / step)
        rows.append(row)
        del llm, engine  # the engine holds the weights and the cache
        gc.collect()
    return rows


def transformers_decode(preset: str, batches: list[int]) -> list[dict]:
    import torch
    from hf_baseline import generate_seconds, hf_llama

    model = hf_llama(preset, 512)
    rows = []
    for batch in batches:
        ids = prompts(batch, model.config.vocab_size)
        # The best of two timed runs, as for ours (one run varied by up to 14% on an H100).
        seconds = generate_seconds(model, ids, LONG, repeats=2)
        # The same compiled graph stopped after SHORT tokens: the difference is transformers'
        # decode step, timed as ours is (prefill and the first token cancel out).
        short = generate_seconds(model, ids, LONG, warmups=1, stop_after=SHORT, repeats=2)
        step = (seconds - short) / (LONG - SHORT)
        rows.append({"model": preset, "batch": batch, "seconds": seconds,
                     "generate_tokens_per_s": batch * LONG / seconds,
                     "ms_per_step": step * 1e3, "tokens_per_s": batch / step})
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def print_tables(report: dict) -> None:
    print(f"\nGPU suite on {report['device']} (JAX {report['jax']}), {report['date']}")
    if "ceilings" in report:
        c = report["ceilings"]
        print(f"copy bandwidth {c['copy_device_gb_per_s']:.0f} GB/s (device time; "
              f"{c['copy_gb_per_s']:.0f} wall); bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s")
    if "attention" in report:
        print("\nbatch context | ours us  TB/s  %copy (wall) | jax-triton TB/s | reference TB/s | "
              "best tuning")
        for r in report["attention"]:
            o, j, ref = r["ours"] or {}, r["jax_pallas_triton"], r["reference"]
            print(f"{r['batch']:5d} {r['context']:7d} | {o.get('us', 0):7.1f} "
                  f"{o.get('kv_tb_per_s', 0):5.2f} {100 * o.get('fraction_of_copy', 0):5.1f} "
                  f"({100 * o.get('wall_fraction_of_copy', 0):4.1f}) | "
                  f"{j.get('kv_tb_per_s', float('nan')):15.2f} | {ref['kv_tb_per_s']:14.2f} | "
                  f"{o.get('tuning')}")
    if "decode" in report:
        hf = {(r["model"], r["batch"]): r for r in report.get("transformers", [])
              if "error" not in r}
        print(f"\nmodel          batch | ms/step floor %floor | generate tok/s: ours "
              f"transformers ratio | decode step ms: transformers ratio  "
              f"({FLAGS.prompt_len}-token prompts, {LONG} new tokens)")
        for r in report["decode"]:
            t = hf.get((r["model"], r["batch"]))
            ours = r["generate_tokens_per_s"]
            ratio = f"{t['generate_tokens_per_s']:12.0f} {ours / t['generate_tokens_per_s']:5.2f}" \
                if t else ""
            if t and "ms_per_step" in t:
                ratio += f" | {t['ms_per_step']:7.2f} {t['ms_per_step'] / r['ms_per_step']:5.2f}"
            print(f"{r['model']:14s} {r['batch']:5d} | {r['ms_per_step']:7.2f} "
                  f"{r.get('floor_ms', 0):5.2f} {100 * r.get('fraction_of_floor', 0):6.1f} | "
                  f"{ours:9.0f} {ratio}")


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    out = Path(FLAGS.output)
    report = json.loads(out.read_text()) if out.exists() else {}
    device = str(jax.devices()[0].device_kind)
    if report.get("device") not in (None, device):
        raise ValueError(f"{out} holds results from {report['device']}, this is {device}; "
                         "pass another --output")
    report.update(header("gpu_suite"))

    def save() -> None:
        write(report, out)

    limits = report.get("ceilings")
    for section in FLAGS.sections:
        start = time.perf_counter()
        if section == "ceilings":
            report["ceilings"] = ceilings()
            limits = report["ceilings"]
        elif section == "attention":
            report["attention"] = []
            for shape in FLAGS.attention_shapes:
                batch, context = (int(n) for n in shape.split("x"))
                report["attention"].append(attention_row(batch, context, limits))
                save()
                gc.collect()
        elif section == "decode":
            report["decode"] = [row for preset, batches in parse_models()
                                for row in engine_decode(preset, batches, limits)]
        elif section == "transformers":
            try:
                report["transformers"] = [row for preset, batches in parse_models()
                                          for row in transformers_decode(preset, batches)]
            except Exception as e:
                report["transformers"] = [{"error": f"{type(e).__name__}: {e}"}]
        else:
            raise ValueError(f"unknown section {section!r}")
        report.setdefault("section_seconds", {})[section] = time.perf_counter() - start
        save()
        # Free what the section left (its arrays, executables) before the next one allocates.
        gc.collect()
        jax.clear_caches()
        live = sum(a.nbytes for a in jax.live_arrays()) / 2**30
        print(f"[{section}] {time.perf_counter() - start:.0f} s; {live:.2f} GiB of JAX arrays "
              "still live", flush=True)
    print_tables(report)
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
