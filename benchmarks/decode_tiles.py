"""The decode-attention kernel's tile sweep by GPU kernel time, at engine-like shapes.

    python benchmarks/decode_tiles.py --output=benchmarks/results/decode_tiles.json

Each shape (`--shapes`) is batch x head_dim x context: 32 query and 8 KV heads, bf16, pages of
16 tokens scattered through the pool, a page table two pages wider than the context. The call
is `decode_and_write`, the engine's decode (the step's new key/value written by the kernel),
once per layer of a multi-layer cache inside one jit with the caches donated: each layer is
read once, so the cache comes cold from HBM as in a decode step (a single layer re-read would
sit in the 50 MB L2). Each tuning (`--tunings`) is pages_per_block:num_warps:num_stages with the
default context splits. Reported: the attention kernel's median time (a tuning that splits the
context also runs a small combine, not counted). GPU only. The default `DecodeTuning` was
chosen from this sweep (`NOTES.md`, tenth session).
"""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from report import header, write
from trace_events import kernel_microseconds

from kernels_pallas.paged_attention import gpu

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["64x64x192", "64x64x1024", "64x128x192", "32x128x1024",
                             "128x128x4096"], "batch x head_dim x context.")
flags.DEFINE_list("tunings", ["8:8:1", "4:4:1", "4:2:1", "2:4:1", "2:2:1"],
                  "pages_per_block:num_warps:num_stages.")
flags.DEFINE_string("output", "benchmarks/results/decode_tiles.json", "JSON output path.")

NUM_HEADS, NUM_KV_HEADS, PAGE_SIZE = 32, 8, 16
COLD_BYTES = 2**28  # caches of fewer bytes a layer get 8 layers, larger ones 2


def attention_us(batch: int, head_dim: int, context: int, tuning: gpu.DecodeTuning) -> float:
    width = context // PAGE_SIZE + 2
    num_pages = batch * width + 8
    layer_bytes = 2 * batch * width * PAGE_SIZE * NUM_KV_HEADS * head_dim * 2
    layers = 8 if layer_bytes < COLD_BYTES else 2
    keys = jax.random.split(jax.random.key(context), 4)
    cache_shape = (layers, num_pages, PAGE_SIZE, NUM_KV_HEADS, head_dim)
    caches = [jax.random.normal(keys[0], cache_shape, jnp.bfloat16),
              jax.random.normal(keys[1], cache_shape, jnp.bfloat16)]
    q = jax.random.normal(keys[2], (layers, batch, NUM_HEADS, head_dim), jnp.bfloat16)
    new_kv = jax.random.normal(keys[3], (layers, batch, NUM_KV_HEADS, head_dim), jnp.bfloat16)
    rng = np.random.default_rng(0)
    tables = jnp.asarray(rng.permutation(num_pages)[:batch * width].reshape(batch, width),
                         jnp.int32)
    seq_lens = jnp.full((batch,), context, jnp.int32)
    slot_pages = tables[:, (context - 1) // PAGE_SIZE]
    slot_offsets = jnp.full((batch,), (context - 1) % PAGE_SIZE, jnp.int32)

    @functools.partial(jax.jit, donate_argnums=(2, 3))
    def every_layer(q, new_kv, k_pages, v_pages):
        outs = []
        for layer in range(layers):
            out, k_pages, v_pages = gpu.decode_and_write(
                q[layer], new_kv[layer], new_kv[layer], k_pages, v_pages, jnp.int32(layer),
                seq_lens, tables, slot_pages, slot_offsets, sm_scale=head_dim ** -0.5,
                tuning=tuning)
            outs.append(out)
        return jnp.stack(outs), k_pages, v_pages

    def run() -> None:
        out, caches[0], caches[1] = every_layer(q, new_kv, *caches)
        out.block_until_ready()

    run()
    return statistics.median(kernel_microseconds(run, "paged_attention_decode"))


def main(argv: list[str]) -> None:
    del argv
    if jax.default_backend() != "gpu":
        raise SystemExit(f"decode_tiles.py times the GPU kernel; this JAX runs on "
                         f"{jax.default_backend()!r}")
    report = header("decode_tiles", num_heads=NUM_HEADS, num_kv_heads=NUM_KV_HEADS,
                    page_size=PAGE_SIZE, rows=[])
    for shape in FLAGS.shapes:
        batch, head_dim, context = (int(x) for x in shape.split("x"))
        row = {"batch": batch, "head_dim": head_dim, "context": context, "us": {}}
        for entry in FLAGS.tunings:
            pages_per_block, warps, stages = (int(x) for x in entry.split(":"))
            tuning = gpu.DecodeTuning(pages_per_block=pages_per_block, num_warps=warps,
                                      num_stages=stages)
            row["us"][entry] = attention_us(batch, head_dim, context, tuning)
            print(f"batch {batch:4d} head_dim {head_dim:4d} context {context:5d} tuning {entry}: "
                  f"{row['us'][entry]:8.2f} µs", flush=True)
        report["rows"].append(row)
        write(report, FLAGS.output)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
