"""FP8 weight matmul for TPUs: a Pallas Mosaic TPU kernel streaming E4M3 weight tiles.

Grid (row block, column block, K block), K the reduction: each step brings one [block_k,
block_n] tile of E4M3 values (and its scale rows) into VMEM through Pallas' pipeline, converts
it to the activations' dtype group by group of 32 rows, multiplies on the MXU and scales each
group's partial product by its power-of-two scale row (per-channel weights: once at the end).
Tested on CPU in TPU interpret mode; no TPU has run it yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dendrite_jax.quant.fp8 import BLOCK, E8M0_BIAS, Fp8Weight


def _kernel(x_ref, w_ref, s_ref, o_ref, acc_ref, *, mx: bool):
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    precision = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None
    block_k = w_ref.shape[0]
    if mx:
        for g in range(block_k // BLOCK):
            part = jnp.dot(x_ref[:, pl.ds(g * BLOCK, BLOCK)],
                           w_ref[pl.ds(g * BLOCK, BLOCK), :].astype(x_ref.dtype),
                           precision=precision, preferred_element_type=jnp.float32)
            exponent = s_ref[pl.ds(g, 1), :].astype(jnp.float32) - E8M0_BIAS
            acc_ref[...] += part * jnp.exp2(exponent)
    else:
        acc_ref[...] += jnp.dot(x_ref[...], w_ref[...].astype(x_ref.dtype), precision=precision,
                                preferred_element_type=jnp.float32)

    @pl.when(step == pl.num_programs(2) - 1)
    def _finish():
        out = acc_ref[...]
        if not mx:
            out = out * s_ref[...].astype(jnp.float32)
        o_ref[...] = out.astype(o_ref.dtype)


def _block(n: int, options: tuple[int, ...]) -> int:
    return next((b for b in options if n % b == 0), n)


def fp8_matmul(x: jax.Array, w: Fp8Weight, *, block_n: int = 256, block_k: int = 512,
               interpret: bool = False) -> jax.Array:
    """x [..., K] @ w [K, N] in x's dtype, reading the weight as FP8."""
    *lead, k = x.shape
    n = w.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    rows = -(-m // 8) * 8  # whole sublanes
    block_m = rows if rows <= 256 else 256
    rows = -(-rows // block_m) * block_m
    if rows != m:
        x2 = jnp.pad(x2, ((0, rows - m), (0, 0)))
    bn = _block(n, tuple(b for b in (block_n, 256, 128) if b <= block_n))
    bk = _block(k, tuple(b for b in (block_k, 512, 256, 128, 64, 32) if b <= block_k))
    mx = w.scheme == "mxfp8"
    if mx:
        scale_spec = pl.BlockSpec((bk // BLOCK, bn), lambda i, j, s: (s, j))
    else:
        scale_spec = pl.BlockSpec((1, bn), lambda i, j, s: (0, j))
    out = pl.pallas_call(
        functools.partial(_kernel, mx=mx),
        grid=(rows // block_m, n // bn, k // bk),
        in_specs=[pl.BlockSpec((block_m, bk), lambda i, j, s: (i, s)),
                  pl.BlockSpec((bk, bn), lambda i, j, s: (s, j)), scale_spec],
        out_specs=pl.BlockSpec((block_m, bn), lambda i, j, s: (i, j)),
        out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype),
        scratch_shapes=[pltpu.VMEM((block_m, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="fp8_matmul_tpu",
    )(x2, w.values, w.scales)
    return out[:m].reshape(*lead, n)
