"""FP8 weight matmul for TPUs: a Pallas Mosaic TPU kernel streaming E4M3 weight tiles.

Grid (row block, column block, K block), K the reduction: each step brings one [block_n,
block_k] tile of the output-major E4M3 values (and its scales) into VMEM through Pallas'
pipeline, converts it to the activations' dtype group by group of 32 K values, multiplies on
the MXU (contracting both operands' minor axis) and scales each group's partial product by its
power-of-two scales (per-channel weights: once at the end). A program's MXFP8 scales come
whole ([block_n, K / 32], a few hundred KB at most): Mosaic's tiling rule would otherwise need
block_k / 32 to be a multiple of 128. Tested on CPU in TPU interpret mode; no TPU has run it
yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.codecs.fp8 import BLOCK, E8M0_BIAS, Fp8Weight
from kernels_pallas.fp8_matmul.reference import rms_normalize


def _kernel(x_ref, w_ref, s_ref, o_ref, acc_ref, *, mx: bool):
    step = pl.program_id(2)

    @pl.when(step == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    precision = jax.lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

    def dot_nt(x, w):  # x [M, k] . w [N, k] -> [M, N]
        return jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ())),
                                   precision=precision, preferred_element_type=jnp.float32)

    groups = w_ref.shape[1] // BLOCK
    if mx:
        for g in range(groups):
            part = dot_nt(x_ref[:, pl.ds(g * BLOCK, BLOCK)], w_ref[:, pl.ds(g * BLOCK, BLOCK)])
            scale_col = pl.ds(step * groups + g, 1)  # the program holds all of K's scales
            exponent = s_ref[:, scale_col].astype(jnp.float32) - E8M0_BIAS  # [block_n, 1]
            acc_ref[...] += part * jnp.exp2(exponent).T
    else:
        acc_ref[...] += dot_nt(x_ref[...], w_ref[...])

    @pl.when(step == pl.num_programs(2) - 1)
    def _finish():
        out = acc_ref[...]
        if not mx:
            out = out * s_ref[...].astype(jnp.float32).T
        o_ref[...] = out.astype(o_ref.dtype)


def _block(n: int, options: tuple[int, ...]) -> int:
    return next((b for b in options if n % b == 0), n)


def fp8_matmul(x: jax.Array, w: Fp8Weight, *, block_n: int = 256, block_k: int = 512,
               interpret: bool = False) -> jax.Array:
    """x [..., K] @ w [K, N] in x's dtype, reading the weight as FP8 (x normalised first, by
    XLA, for a weight with a folded norm)."""
    if w.input_rms_eps is not None:
        x = rms_normalize(x, w.input_rms_eps)
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
    mx = w.scheme == "mxfp8"
    bk = _block(k, tuple(b for b in (block_k, 512, 256, 128) if b <= block_k))
    scale_spec = pl.BlockSpec((bn, k // BLOCK if mx else 1), lambda i, j, s: (j, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, mx=mx),
        grid=(rows // block_m, n // bn, k // bk),
        in_specs=[pl.BlockSpec((block_m, bk), lambda i, j, s: (i, s)),
                  pl.BlockSpec((bn, bk), lambda i, j, s: (j, s)), scale_spec],
        out_specs=pl.BlockSpec((block_m, bn), lambda i, j, s: (i, j)),
        out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype),
        scratch_shapes=[pltpu.VMEM((block_m, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="fp8_matmul_tpu",
    )(x2, w.values, w.scales)
    return out[:m].reshape(*lead, n)
