"""Decode-shaped matmuls with fused epilogues (`kernels_pallas.decode_matmul`) against XLA's
dot followed by the same elementwise work, at the Llama-3.2-1B shapes.

    python benchmarks/decode_matmul.py

Two blocks, each timed as XLA's program and with the kernels (best of a sweep of tunings): the
MLP (gate/up matmul, silu·up, down matmul, residual add) and the o projection with its residual
add. Each timing chains the block through distinct weight copies (several times what the L2
cache holds) for several passes inside one jit; microseconds per block and weight bytes read per
second. Writes JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from jax import lax
from report import header, write

from kernels_pallas.decode_matmul.gpu import MatmulTuning, gate_up_silu, matmul_add

FLAGS = flags.FLAGS
flags.DEFINE_list("rows", ["2", "64"], "Rows (decode batch) per matmul.")
flags.DEFINE_string("out", "", "JSON path (default: results/decode_matmul_<device>.json).")

# Llama-3.2-1B: hidden 2048, MLP 8192, 32 x 64 query dims.
HIDDEN, MLP, Q = 2048, 8192, 2048
SWEEP = [MatmulTuning(block_n=n, block_k=k, num_warps=w, num_stages=s)
         for n, k, w, s in itertools.product((16, 32, 64), (128, 256), (4, 8), (3, 4))
         if (k * n * (2 if n < 128 else 1) + 64 * k) * 2 * s <= 200 * 1024]


def xla_mlp(x, w_gate_up, w_down):
    gate, up = jnp.split(x @ w_gate_up, 2, axis=-1)
    return x + (jax.nn.silu(gate) * up) @ w_down


def our_mlp(gate_up: MatmulTuning, down: MatmulTuning):
    def mlp(x, w_gate_up, w_down):
        return matmul_add(gate_up_silu(x, w_gate_up, tuning=gate_up), w_down, x, tuning=down)
    return mlp


def xla_o(x, w_o):
    return x + x @ w_o


def our_o(tuning: MatmulTuning):
    return lambda x, w_o: matmul_add(x, w_o, x, tuning=tuning)


def seconds(block, x, layers, *, passes: int = 10, repeats: int = 5) -> float:
    """Median seconds per block(x, *layer) -> x, chained through distinct weight copies
    (`layers`) for `passes` passes inside one jit (launch overhead amortised)."""
    @jax.jit
    def run(x, layers):
        def one_pass(_, x):
            for weights in layers:
                x = block(x, *weights)
            return x
        return lax.fori_loop(0, passes, one_pass, x)

    jax.block_until_ready(run(x, layers))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(x, layers))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / (passes * len(layers))


def best_of(make_block, tunings, x, layers) -> tuple[float, MatmulTuning]:
    best = (float("inf"), None)
    for tuning in tunings:
        try:
            best = min(best, (seconds(make_block(tuning), x, layers), tuning),
                       key=lambda t: t[0])
        except Exception as e:  # a tuning Triton cannot compile (shared memory): skip it
            print(f"  skipped {tuning}: {type(e).__name__}")
    return best


def main(argv: list[str]) -> None:
    del argv
    key = jax.random.key(0)

    def weight(i, shape):
        return jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16) * 0.02

    mlp_layers = [(weight(2 * i, (HIDDEN, 2 * MLP)), weight(2 * i + 1, (MLP, HIDDEN)))
                  for i in range(3)]  # 3 x 100 MB
    o_layers = [(weight(100 + i, (Q, HIDDEN)),) for i in range(24)]  # 24 x 8 MB
    mlp_bytes = 3 * HIDDEN * MLP * 2
    rows = []
    for m in [int(r) for r in FLAGS.rows]:
        x = jax.random.normal(jax.random.key(m), (m, HIDDEN), jnp.bfloat16)
        base = seconds(xla_mlp, x, mlp_layers)
        _, up_t = best_of(functools.partial(our_mlp, down=MatmulTuning()), SWEEP, x, mlp_layers)
        ours, down_t = best_of(functools.partial(our_mlp, up_t), SWEEP, x, mlp_layers)
        rows.append({"block": "mlp (gate/up, silu·up, down, residual)", "rows": m,
                     "xla_us": base * 1e6, "ours_us": ours * 1e6,
                     "xla_gb_per_s": mlp_bytes / base / 1e9,
                     "ours_gb_per_s": mlp_bytes / ours / 1e9, "speedup": base / ours,
                     "tuning": {"gate_up": dataclasses.asdict(up_t),
                                "down": dataclasses.asdict(down_t)}})
        base = seconds(xla_o, x, o_layers)
        ours, o_t = best_of(our_o, SWEEP, x, o_layers)
        rows.append({"block": "o projection + residual", "rows": m, "xla_us": base * 1e6,
                     "ours_us": ours * 1e6, "xla_gb_per_s": Q * HIDDEN * 2 / base / 1e9,
                     "ours_gb_per_s": Q * HIDDEN * 2 / ours / 1e9, "speedup": base / ours,
                     "tuning": {"o": dataclasses.asdict(o_t)}})
        for row in rows[-2:]:
            print(f"{row['block']:40s} rows {m:3d}: XLA {row['xla_us']:7.1f} µs "
                  f"({row['xla_gb_per_s']:5.0f} GB/s)  ours {row['ours_us']:7.1f} µs "
                  f"({row['ours_gb_per_s']:5.0f} GB/s)  {row['speedup']:.2f}x  {row['tuning']}")
    report = header("decode_matmul", rows=rows)
    out = FLAGS.out or (f"{__file__.rsplit('/', 1)[0]}/results/decode_matmul_"
                        f"{jax.devices()[0].platform}.json")
    print(write(report, out))


if __name__ == "__main__":
    app.run(main)
